"""SAP's attention alone: forward + backward of `SAP.mean_attention` for each formulation and shape.

Each case runs in a fresh process (`python -m bench.sap_attention --case JSON`), so its peak
RSS is its own. Driven by `python bench/train_head.py [--sap-only]`.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from heads.model.pooling import SAP, flash_pays

REPO = Path(__file__).resolve().parents[1]


SAP_SECTION = "## SAP's attention alone"
SAP_SHAPES = [(80, 200), (80, 600), (80, 950), (1024, 200), (1024, 600), (1024, 950)]  # (D, S)
SAP_BATCH, SAP_HEADS = 64, 8


def dense_mean_attention(sap: SAP, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SAP.mean_attention as it was before 60c5d0b, kept to measure against: it holds the (B, H, S, S) weights."""
    B, S, D = x.shape
    H, d = sap.heads, D // sap.heads
    w_q, w_k, w_v = sap.mhsa.in_proj_weight.chunk(3)  # (D, D) each
    b_q, b_k, b_v = sap.mhsa.in_proj_bias.chunk(3)  # (D,) each
    q = F.linear(x, w_q, b_q).view(B, S, H, d).transpose(1, 2)  # (B, H, S, d)
    k = F.linear(x, w_k, b_k).view(B, S, H, d).transpose(1, 2)  # (B, H, S, d)
    keys = mask.clone()
    keys[:, 0] |= ~mask.any(dim=1)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)  # (B, H, S, S)
    attn = logits.masked_fill(~keys[:, None, None, :], float("-inf")).softmax(dim=-1)  # (B, H, S, S)
    weights = mask.to(x.dtype) / mask.sum(dim=1, keepdim=True).clamp(min=1)  # (B, S)
    abar = torch.einsum("bhij,bi->bhj", attn, weights)  # (B, H, S)
    z = torch.einsum("bhj,bjd->bhd", abar, x)  # (B, H, D)
    v = torch.einsum("bhd,hed->bhe", z, w_v.view(H, d, D)) + b_v.view(H, d) * abar.sum(-1, keepdim=True)  # (B, H, d)
    out = sap.mhsa.out_proj(v.reshape(B, D))  # (B, D)
    return out * mask.any(dim=1, keepdim=True).to(out.dtype)


SAP_FORMULATIONS = {
    "dense (before)": dense_mean_attention,
    "chunked": SAP.mean_attention_chunked,
    "flash": SAP.mean_attention_flash,
}


def sap_case(name: str, frames: int, dim: int, threads: int, repeats: int) -> dict:
    """Forward + backward seconds of one formulation (each repeat) and this process's peak RSS (run in a child)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sap = SAP(dim, SAP_HEADS)
    x = torch.randn(SAP_BATCH, frames, dim)  # (B, S, D)
    lengths = torch.randint(int(0.8 * frames), frames + 1, (SAP_BATCH,))  # a length-bucketed batch
    lengths[0] = frames
    mask = torch.arange(frames)[None, :] < lengths[:, None]  # (B, S)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # MiB
    seconds = []
    for _ in range(repeats):
        xg = x.clone().requires_grad_(True)  # the layer mix upstream needs dL/dx
        start = time.perf_counter()
        SAP_FORMULATIONS[name](sap, xg, mask).square().sum().backward()
        seconds.append(time.perf_counter() - start)
        sap.zero_grad()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    return {"name": name, "frames": frames, "dim": dim, "threads": threads, "seconds": seconds,
            "rss_before_mib": before, "peak_rss_mib": peak}


def sap_shapes(repeats: int, saved: Path, reuse: bool) -> list[dict]:
    """Every formulation x shape x thread count, each in a fresh process (so ru_maxrss is that case's peak).

    The raw results go to `saved`; with `reuse` they are read back from there instead of measured again.
    """
    if reuse and saved.exists():
        return json.loads(saved.read_text())
    results = []
    for threads in (1, 2):
        for dim, frames in SAP_SHAPES:
            for name in SAP_FORMULATIONS:  # interleaved, so load changes on the shared machine hit all alike
                reps = repeats if dim < 512 else max(2, repeats - 1)
                cmd = [sys.executable, "-m", "bench.sap_attention", "--case", json.dumps([name, frames, dim, threads, reps])]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO).stdout
                results.append(json.loads(out.strip().splitlines()[-1]))
                r = results[-1]
                print(f"SAP {name:15s} D={dim:5d} S={frames:4d} threads={threads}: min {min(r['seconds']):.2f} s, "
                      f"peak RSS {r['peak_rss_mib']:.0f} MiB", flush=True)
    saved.write_text(json.dumps(results, indent=1))
    return results


def sap_report(results: list[dict], repeats: int) -> list[str]:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    names = list(SAP_FORMULATIONS)
    lines = [
        SAP_SECTION, "",
        f"Forward + backward (dL/dx included, as the layer mix needs it) of `SAP.mean_attention` on a batch of "
        f"B = {SAP_BATCH} utterances x S speech frames (lengths 0.8 S - S, as length bucketing gives), D features, "
        f"{SAP_HEADS} heads; float32. Time: the fastest of {repeats} passes (D = 1024: of {max(2, repeats - 1)}); "
        "peak RSS of a fresh process per case (about 0.25 GiB of it is torch and the inputs). Formulations: "
        "**dense (before)** held the (B, heads, S, S) weights; **chunked** averages before V and the output "
        "projection with a query-blocked softmax that recomputes in backward; **flash** runs V per frame and "
        "`scaled_dot_product_attention` (CPU flash kernel). `mean_attention` (auto) picks flash when "
        "D <= S (`heads/model/pooling.py: flash_pays`). Load average when it finished: " + load + ".", "",
        "| D | S | threads | " + " | ".join(f"{n} s" for n in names) + " | " + " | ".join(f"{n} GiB" for n in names)
        + " | auto picks | auto / dense, time | auto / dense, peak RSS |",
        "|---:|---:|---:|" + "---:|" * (2 * len(names)) + "---|---:|---:|",
    ]
    by_key = {(r["name"], r["dim"], r["frames"], r["threads"]): r for r in results}
    for threads in (1, 2):
        for dim, frames in SAP_SHAPES:
            rs = [by_key[(n, dim, frames, threads)] for n in names]
            times = [min(r["seconds"]) for r in rs]
            peaks = [r["peak_rss_mib"] / 2**10 for r in rs]
            auto = "flash" if flash_pays(frames, dim) else "chunked"
            a = names.index(auto)
            lines.append(f"| {dim} | {frames} | {threads} | " + " | ".join(f"{t:.2f}" for t in times) + " | "
                         + " | ".join(f"{m:.2f}" for m in peaks)
                         + f" | {auto} | {times[a] / times[0]:.2f} | {peaks[a] / peaks[0]:.2f} |")
    return lines + [""]


if __name__ == "__main__" and sys.argv[1:2] == ["--case"]:  # one case, in this fresh process
    print(json.dumps(sap_case(*json.loads(sys.argv[2]))))
