"""INT8 weight-only quantisation (model/quant.py): weight memory and logits error against bf16 and float32.

For each config (random initialisation, or a checkpoint), on random token ids: the float32 model, the same
weights cast to bf16, int8 with bf16 activations and int8 with float32 activations. Errors are relative RMS
over all logits (||a - b|| / ||b||), the largest absolute error relative to the largest |logit|, the
agreement of the top-1 token, and the mean KL divergence of the next-token distributions.

    python bench/quant_error.py [--configs configs/model/jamba-tiny.yaml configs/model/jamba-small.yaml]
                                [--checkpoint DIR] [--seq 128] [--batch 4]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import Jamba, JambaConfig  # noqa: E402
from model.memory import weight_bytes  # noqa: E402
from model.quant import model_bytes, quantize_int8  # noqa: E402


def compare(test: torch.Tensor, ref: torch.Tensor) -> dict:
    test, ref = test.float(), ref.float()
    kl = torch.sum(ref.softmax(-1) * (ref.log_softmax(-1) - test.log_softmax(-1)), -1).mean()
    return {"rel_rms": ((test - ref).norm() / ref.norm()).item(),
            "rel_max": ((test - ref).abs().max() / ref.abs().max()).item(),
            "top1_agree": (test.argmax(-1) == ref.argmax(-1)).float().mean().item(), "kl": kl.item()}


@torch.no_grad()
def measure(name: str, model: Jamba, seq: int, batch: int, seed: int) -> dict:
    model = model.float().eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.cfg.vocab_size, (batch, seq), generator=gen)
    fp32 = model(ids).logits
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16 = bf16_model(ids).logits
    int8_model = quantize_int8(copy.deepcopy(model))
    int8 = int8_model(ids).logits
    int8_fp32 = quantize_int8(copy.deepcopy(model), dtype=torch.float32)(ids).logits
    return {
        "model": name,
        "bytes": {"fp32": model_bytes(model), "bf16": model_bytes(bf16_model), "int8": model_bytes(int8_model),
                  "int8_predicted": weight_bytes(model.cfg, "int8")["total"]},
        "bf16_vs_fp32": compare(bf16, fp32), "int8_vs_bf16": compare(int8, bf16), "int8_vs_fp32": compare(int8, fp32),
        "int8_fp32_activations_vs_fp32": compare(int8_fp32, fp32),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", type=Path, nargs="*",
                        default=[ROOT / "configs/model/jamba-tiny.yaml", ROOT / "configs/model/jamba-small.yaml"])
    parser.add_argument("--checkpoint", type=Path, action="append", default=[], help="native or HF checkpoint dir")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3, help="random initialisations per config")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/quant_error.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for path in args.configs:
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            rows.append(measure(f"{path.stem} (random init, seed {seed})", Jamba(JambaConfig.from_yaml(path)),
                                args.seq, args.batch, seed))
    for ckpt in args.checkpoint:
        from model.hf import load_any

        rows.append(measure(str(ckpt), load_any(ckpt, torch.float32), args.seq, args.batch, 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seq": args.seq, "batch": args.batch, "torch": torch.__version__,
                                    "results": rows}, indent=2) + "\n")
    print(f"{'model':<36}{'fp32 MB':>9}{'bf16 MB':>9}{'int8 MB':>9}   rel. RMS: bf16/fp32  int8/bf16  int8/fp32"
          "   top-1 int8=bf16   KL int8||bf16")
    for r in rows:
        b = r["bytes"]
        print(f"{r['model']:<36}{b['fp32'] / 2**20:>9.2f}{b['bf16'] / 2**20:>9.2f}{b['int8'] / 2**20:>9.2f}"
              f"{r['bf16_vs_fp32']['rel_rms']:>21.4f}{r['int8_vs_bf16']['rel_rms']:>11.4f}"
              f"{r['int8_vs_fp32']['rel_rms']:>11.4f}{r['int8_vs_bf16']['top1_agree']:>18.3f}"
              f"{r['int8_vs_bf16']['kl']:>16.2e}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
