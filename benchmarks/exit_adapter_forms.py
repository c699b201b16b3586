"""Exit adapter forms and losses on the frozen SmolLM2: the one-off experiment behind the model card's table.

Trains each requested adapter on the greedy continuations of HumanEval problems 0-99 and reports its top-1
agreement with the last layer on those of problems 100-123 (all positions, and the last 120 of each text, the
model's own continuation), over a draft vocabulary of the K ids the full model predicts most often on the training
texts. The texts are `hf-layerskip train-draft`'s HumanEval shards (WORK_DIR/data/humaneval/*.jsonl).

    python benchmarks/exit_adapter_forms.py WORK_DIR/data/humaneval 4,8,12 \
        8:linear:ce:8192:8 8:linear:kl:8192:8 8:linear:mix:8192:8 8:lowrank64:mix:8192:8 8:mlp1152:mix:8192:8

Each spec is E:form:loss:K:epochs, with form linear, lowrank64 or mlp1152 and loss ce, kl or mix (both). The
package's `ExitAdapter` is the linear and low-rank forms; the MLP form exists only here, for comparison.
"""
import json, sys, time, glob
import torch, torch.nn as nn, torch.nn.functional as F
from transformers import AutoTokenizer
from hf_layerskip.modeling import LayerSkipLlamaForCausalLM
torch.manual_seed(0)
from hf_layerskip.defaults import base_checkpoint

base = base_checkpoint()
model = LayerSkipLlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(base)
EXITS = [int(x) for x in sys.argv[2].split(",")]
files = sorted(glob.glob(f"{sys.argv[1]}/*.jsonl"))
texts = [json.loads(l)["text"] for f in files for l in open(f)]
train_texts, val_texts = texts[:100], texts[100:]
GEN = 120  # last tokens ~ the model's own continuation

@torch.inference_mode()
def collect(texts):
    hs = {e: [] for e in EXITS}; fin = []; tgt = []; gen_mask = []
    for t in texts:
        ids = tok(t, return_tensors="pt", truncation=True, max_length=512)["input_ids"]
        out = model(input_ids=ids, use_cache=False, output_layer_hidden_states=True)
        for e in EXITS: hs[e].append(out.layer_hidden_states[e - 1][0])
        fin.append(model.model.norm(out.layer_hidden_states[-1][0]))
        tgt.append(out.logits[0].argmax(-1))
        m = torch.zeros(ids.shape[1], dtype=torch.bool); m[-GEN:] = True; gen_mask.append(m)
    return {e: torch.cat(v) for e, v in hs.items()}, torch.cat(fin), torch.cat(tgt), torch.cat(gen_mask)

t0 = time.time()
tr = collect(train_texts); va = collect(val_texts)
print(f"collected {len(tr[2])} train / {len(va[2])} val tokens in {time.time()-t0:.0f}s", flush=True)
W = model.lm_head.weight.detach(); norm = model.model.norm
counts = torch.bincount(tr[2], minlength=W.shape[0])
order = counts.argsort(descending=True)
for K in (1024, 2048, 4096, 8192, 16384):
    ins = torch.zeros(W.shape[0], dtype=torch.bool); ins[order[:K]] = True
    print(f"K={K}: coverage train {ins[tr[2]].float().mean():.3f} val {ins[va[2]].float().mean():.3f} val-gen {ins[va[2][va[3]]].float().mean():.3f}")

class Linear(nn.Module):
    def __init__(s, h, r=None):
        super().__init__()
        if r is None: s.a = nn.Linear(h, h, bias=False); nn.init.zeros_(s.a.weight); s.b = None
        else: s.a = nn.Linear(h, r, bias=False); s.b = nn.Linear(r, h, bias=False); nn.init.zeros_(s.b.weight)
    def forward(s, x): return x + (s.a(x) if s.b is None else s.b(s.a(x)))
class MLP(nn.Module):
    def __init__(s, h, m):
        super().__init__(); s.a = nn.Linear(h, m); s.b = nn.Linear(m, h); nn.init.zeros_(s.b.weight); nn.init.zeros_(s.b.bias)
    def forward(s, x): return x + s.b(F.silu(s.a(x)))

def agreement(adapter, h, fin_tgt, mask, ids):
    with torch.no_grad():
        x = adapter(h) if adapter is not None else h
        pred = ids[(norm(x) @ W[ids].T).argmax(-1)] if ids is not None else (norm(x) @ W.T).argmax(-1)
        ok = pred == fin_tgt
        return ok.float().mean().item(), ok[mask].float().mean().item()

def train(e, form, loss_kind, K, epochs, lr=1e-3, bs=512):
    h, fin, tgt, _ = tr
    ids = order[:K]
    Wk = W[ids]
    pos = torch.full((W.shape[0],), -1, dtype=torch.long); pos[ids] = torch.arange(K)
    sub_tgt = pos[tgt]
    adapter = {"linear": lambda: Linear(576), "lowrank64": lambda: Linear(576, 64), "mlp1152": lambda: MLP(576, 1152)}[form]()
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0)
    n = len(tgt); steps = epochs * (n // bs); sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    t = time.time()
    for step in range(steps):
        if step % (n // bs) == 0: perm = torch.randperm(n)
        b = perm[(step % (n // bs)) * bs:(step % (n // bs) + 1) * bs]
        logits = norm(adapter(h[e][b])) @ Wk.T
        loss = 0
        if loss_kind in ("ce", "mix"):
            keep = sub_tgt[b] >= 0
            loss = loss + F.cross_entropy(logits[keep], sub_tgt[b][keep])
        if loss_kind in ("kl", "mix"):
            with torch.no_grad(): tl = (fin[b] @ Wk.T).log_softmax(-1)
            loss = loss + F.kl_div(logits.log_softmax(-1), tl, log_target=True, reduction="batchmean")
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    a = agreement(adapter, va[0][e], va[2], va[3], ids)
    print(f"E={e} {form} {loss_kind} K={K} ep={epochs}: val agree {a[0]:.3f} gen {a[1]:.3f} ({time.time()-t:.0f}s)", flush=True)
    return adapter

for e in EXITS:
    print(f"E={e} base full-vocab: val {agreement(None, va[0][e], va[2], va[3], None)}; K=8192 {agreement(None, va[0][e], va[2], va[3], order[:8192])}", flush=True)
for spec in sys.argv[3:]:
    e, form, lk, K, ep = spec.split(":")
    train(int(e), form, lk, int(K), int(ep))
