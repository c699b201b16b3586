"""Attention time of a verification pass: stock `sdpa` attention against `packed_sdpa_attention`, which folds each
key/value head's query heads into its query positions instead of copying the keys and values per query head.

SmolLM2's attention shape (9 query heads sharing 3 key/value heads, head size 64) over a masked cache, for each batch
size and number of query positions; medians of `--repeats` calls, and the largest difference between the two outputs.

    python benchmarks/packed_attention.py --output docs/default_model/packed_attention.json
"""

import argparse
import json
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_layerskip.generation.metrics import machine_description
from hf_layerskip.generation.speedup_bound import _median_seconds
from hf_layerskip.modeling.packed_attention import packed_sdpa_attention


class GroupedAttention(torch.nn.Module):
    """What an attention function reads from a layer's attention module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--query-lengths", type=int, nargs="+", default=[2, 5, 8])
    parser.add_argument("--cached", type=int, default=450, help="key positions, a tenth of them masked")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--output", default=None, help="JSON file for the table")
    options = parser.parse_args()
    torch.manual_seed(0)
    dtype = getattr(torch, options.dtype)
    heads, key_value_heads, head_dim = 9, 3, 64
    module = GroupedAttention(heads // key_value_heads)
    rows = []
    print(f"| B | query positions | sdpa µs | packed µs | sdpa / packed | max difference |\n|---|---|---|---|---|---|")
    for batch_size in options.batch_sizes:
        key = torch.randn(batch_size, key_value_heads, options.cached, head_dim, dtype=dtype)
        value = torch.randn_like(key)
        for query_length in options.query_lengths:
            query = torch.randn(batch_size, query_length, heads, head_dim, dtype=dtype).transpose(1, 2)
            mask = torch.ones(batch_size, 1, query_length, options.cached, dtype=torch.bool)
            mask[..., : options.cached // 10] = False  # padding or holes
            mask[..., -query_length:] = torch.ones(query_length, query_length, dtype=torch.bool).tril()

            def stock():
                return sdpa_attention_forward(module, query, key, value, mask, scaling=head_dim**-0.5)[0]

            def packed():
                return packed_sdpa_attention(module, query, key, value, mask, scaling=head_dim**-0.5)[0]

            row = {
                "batch_size": batch_size,
                "query_length": query_length,
                "sdpa_us": 1e6 * _median_seconds(stock, options.repeats, key.device),
                "packed_us": 1e6 * _median_seconds(packed, options.repeats, key.device),
                "max_difference": float((stock().float() - packed().float()).abs().max()),
            }
            rows.append(row)
            print(
                f"| {batch_size} | {query_length} | {row['sdpa_us']:.0f} | {row['packed_us']:.0f} | "
                f"{row['sdpa_us'] / row['packed_us']:.2f} | {row['max_difference']:.1e} |"
            )
    if options.output:
        Path(options.output).parent.mkdir(parents=True, exist_ok=True)
        result = {"machine": machine_description(torch.device("cpu")), "settings": vars(options), "rows": rows}
        Path(options.output).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
