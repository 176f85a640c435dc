"""`make bench`: SuperCLIP's costs as ratios measured side by side in one run (medians, warm-up excluded).

1. training step time SuperCLIP / CLIP, same towers and batch (fp32 and amp_bf16), and its two parts: forward +
   backward, and the AdamW update (which grows with the head's V x W parameters, not with the batch); with
   --fused-head-update also SuperCLIP whose head weight is in a fused AdamW group (an experiment);
2. class-loss peak memory chunked / dense at B=1024 (or the --class-batch list), V=49408, fp32 and under bf16
   autocast (CUDA: max_memory_allocated; CPU: the peak of the CPU allocator's total in torch.profiler's
   allocation/free timeline, minus its starting level);
3. class-loss forward+backward time chunked / dense, same batches and precisions;
4. the IDF builder against the naive tokenizer loop (bench/bench_idf.py).
"""
import argparse
import datetime
import itertools
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch

import open_clip_superclip  # noqa: F401  (activates the plugin even without site hooks)
import open_clip
from open_clip.loss import ClipLoss
from open_clip.model import CLIP

from open_clip_superclip import ClassificationAugmentedLoss, to_stock_state_dict
from open_clip_superclip.fused_head import fused_head_logsumexp
from open_clip_superclip.model import ClassHead

REPO = Path(__file__).resolve().parent.parent
CAPTIONS = ["a photo of a dog on a red sofa", "two cats sleeping in the sun", "a man reading a newspaper",
            "an aerial view of a city at night with many lights", "a bowl of fruit!", "a red car"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _interleaved_medians(fns, repeats, warmup):
    """Alternates the candidates step by step so machine noise hits them alike. Each fn times itself and returns
    {phase: seconds}; the result is {candidate: {phase: median seconds}}."""
    samples = {name: [] for name in fns}
    for i in range(warmup + repeats):
        for name, fn in fns.items():
            timing = fn()
            if i >= warmup:
                samples[name].append(timing)
    return {name: {phase: statistics.median(t[phase] for t in values) for phase in values[0]}
            for name, values in samples.items()}


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return {"total": time.perf_counter() - start}


def _tokens(batch, device):
    tokenizer = open_clip.get_tokenizer("SuperCLIP-ViT-B-16")
    return tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]).to(device)


FUSED_HEAD = "SuperCLIP, head weight in a fused AdamW group"


def step_time_ratio(model_name, batch, precision, device, repeats, warmup, fused_head_update=False):
    torch.manual_seed(0)
    superclip = open_clip.create_model(model_name, output_dict=True, device=device)
    cfg = open_clip.get_model_config(model_name)
    cfg.pop("superclip_cfg")
    clip = CLIP(**cfg, output_dict=True).to(device)
    clip.load_state_dict(to_stock_state_dict(superclip.state_dict()))
    images = torch.randn(batch, 3, *superclip.visual.image_size, device=device)
    texts = _tokens(batch, device)
    losses = {"CLIP": ClipLoss(), "SuperCLIP": ClassificationAugmentedLoss(ClipLoss(), 1.0,
                                                                           statistics=superclip.class_idf)}
    models = {"CLIP": clip.train(), "SuperCLIP": superclip.train()}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    if fused_head_update:  # an experiment, not what the trainer does: the stock AdamW picks its own kernels
        twin = open_clip.create_model(model_name, output_dict=True, device=device)
        twin.load_state_dict(superclip.state_dict())
        head_weight = twin.class_head.proj.weight
        others = [p for p in twin.parameters() if p is not head_weight]
        models[FUSED_HEAD] = twin.train()
        losses[FUSED_HEAD] = ClassificationAugmentedLoss(ClipLoss(), 1.0, statistics=twin.class_idf)
        optimizers[FUSED_HEAD] = torch.optim.AdamW([{"params": others}, {"params": [head_weight], "fused": True}],
                                                   lr=1e-5)
    dtype = torch.bfloat16 if precision == "amp_bf16" else None

    def step(name):
        """Seconds of one training step, of its forward + backward, and of its AdamW update."""
        _sync(device)
        start = time.perf_counter()
        optimizers[name].zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = models[name](images, texts)
            total = sum(losses[name](**out, output_dict=True).values())
        total.backward()
        _sync(device)
        backward_done = time.perf_counter()
        optimizers[name].step()
        _sync(device)
        end = time.perf_counter()
        return {"step": end - start, "forward+backward": backward_done - start, "optimizer": end - backward_done}

    return _interleaved_medians({name: (lambda name=name: step(name)) for name in models}, repeats, warmup)


def _class_loss_inputs(batch, width, device):
    torch.manual_seed(0)
    head = ClassHead(width, 49408).to(device)
    features = torch.randn(batch, width, device=device, requires_grad=True)
    return head, features, _tokens(batch, device)


def _class_loss_step(impl, head, features, tokens, loss, autocast_dtype=None):
    with torch.autocast(features.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        _class_loss_forward_backward(impl, head, features, tokens, loss)


def _class_loss_forward_backward(impl, head, features, tokens, loss):
    if impl == "dense":
        value = loss.class_loss(tokens, class_logits=head(features))
    else:
        lse, token_logits = fused_head_logsumexp(head.norm(features), head.proj.weight, head.proj.bias, tokens)
        value = loss.class_loss(tokens, class_logsumexp=lse, class_token_logits=token_logits)
    value.backward()


def class_loss_peak_memory(impl, batch, width, device, autocast_dtype=None):
    head, features, tokens = _class_loss_inputs(batch, width, device)
    loss = ClassificationAugmentedLoss(ClipLoss(), 1.0, idf="none")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _class_loss_step(impl, head, features, tokens, loss, autocast_dtype)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        _class_loss_step(impl, head, features, tokens, loss, autocast_dtype)
    # the profiler's allocation/free timeline of the CPU allocator (a private but documented-in-code API)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return max(sum(categories) for categories in sizes) - min(sum(categories) for categories in sizes)


def class_loss_time(batch, width, device, repeats, warmup, autocast_dtype=None):
    head, features, tokens = _class_loss_inputs(batch, width, device)
    loss = ClassificationAugmentedLoss(ClipLoss(), 1.0, idf="none")
    fns = {impl: (lambda impl=impl: _timed(lambda: _class_loss_step(impl, head, features, tokens, loss,
                                                                     autocast_dtype), device))
           for impl in ("dense", "chunked")}
    return {impl: phases["total"] for impl, phases in _interleaved_medians(fns, repeats, warmup).items()}


def idf_rows(n_captions):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import bench_idf
    except ImportError as error:
        return [("IDF builder", f"not measured ({error})")]
    return bench_idf.run(n_captions)


def machine_line(device):
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    versions = ", ".join(f"{p} {version(p)}" for p in ("torch", "open_clip_torch"))
    return f"{where}; Python {platform.python_version()}; {versions}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="SuperCLIP-ViT-B-16")
    parser.add_argument("--batch-size", type=int, default=None, help="step-time batch (16 on CPU, 256 on CUDA)")
    parser.add_argument("--precisions", default=None, help="comma list (CPU: fp32,amp_bf16; CUDA: amp_bf16)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--class-batch", default="1024", help="comma list of class-loss batch sizes")
    parser.add_argument("--idf-captions", type=int, default=200_000, help="0 skips the IDF builder benchmark")
    parser.add_argument("--sections", default="step,class-loss,idf", help="comma list of what to measure")
    parser.add_argument("--fused-head-update", action="store_true",
                        help="also time SuperCLIP with the head's weight updated by fused AdamW (an experiment)")
    parser.add_argument("--output", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    batch = args.batch_size or (256 if on_cuda else 16)
    precisions = (args.precisions or ("amp_bf16" if on_cuda else "fp32,amp_bf16")).split(",")
    repeats = args.repeats or (20 if on_cuda else 3)
    width = open_clip.get_model_config(args.model)["vision_cfg"]["width"]

    sections = set(args.sections.split(","))
    rows = []
    for precision in precisions if "step" in sections else ():
        medians = step_time_ratio(args.model, batch, precision, device, repeats, warmup=2 if on_cuda else 1,
                                  fused_head_update=args.fused_head_update)
        clip = medians["CLIP"]
        for candidate in [c for c in medians if c != "CLIP"]:
            for phase, what in (("step", "step time"), ("forward+backward", "  of which forward+backward"),
                                ("optimizer", "  of which the AdamW update")):
                ours = medians[candidate][phase]
                rows.append((f"{what} {candidate} / CLIP ({args.model}, batch {batch}, {precision})",
                             f"{ours / clip[phase]:.4f}  ({ours:.3f} s / {clip[phase]:.3f} s)"))
            # Paid whatever the class loss does: with forward+backward at parity, the step ratio is 1 + this share.
            extra_update = medians[candidate]["optimizer"] - clip["optimizer"]
            rows.append((f"  the head's AdamW update alone / CLIP step ({candidate}, {precision})",
                         f"{extra_update / clip['step']:.4f}  ({extra_update:+.3f} s of {clip['step']:.3f} s)"))
            print(*rows[-4:], sep="\n", flush=True)
    # the class loss alone, in fp32 and under bf16 autocast (what amp_bf16 training uses), at each batch asked for
    head_grad_mib = (49408 * width + 49408) * 4 / 2**20
    class_loss_precisions = (("fp32", None), ("amp_bf16", torch.bfloat16))
    class_batches = [int(b) for b in args.class_batch.split(",")] if "class-loss" in sections else []
    for class_batch, (label, dtype) in itertools.product(class_batches, class_loss_precisions):
        memory = {impl: class_loss_peak_memory(impl, class_batch, width, device, dtype)
                  for impl in ("dense", "chunked")}
        extra = {impl: memory[impl] / 2**20 - head_grad_mib for impl in memory}
        rows.append((f"class-loss peak memory chunked / dense (B={class_batch}, V=49408, W={width}, {label})",
                     f"{memory['chunked'] / memory['dense']:.4f}  ({memory['chunked'] / 2**20:.0f} MiB / "
                     f"{memory['dense'] / 2**20:.0f} MiB; beyond the head's {head_grad_mib:.0f} MiB weight "
                     f"gradient: {extra['chunked'] / extra['dense']:.4f})"))
        print(rows[-1], flush=True)
        times = class_loss_time(class_batch, width, device, repeats, 2 if on_cuda else 1, dtype)
        rows.append((f"class-loss fwd+bwd time chunked / dense (B={class_batch}, {label})",
                     f"{times['chunked'] / times['dense']:.4f}  ({times['chunked'] * 1e3:.1f} ms / "
                     f"{times['dense'] * 1e3:.1f} ms)"))
        print(rows[-1], flush=True)
    if args.idf_captions and "idf" in sections:
        rows.extend(idf_rows(args.idf_captions))

    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    table = [f"### {device.type.upper()} — {stamp}", "", f"Machine: {machine_line(device)}", "",
             "| measurement | ratio (absolute) |", "|---|---|"]
    table += [f"| {name} | {value} |" for name, value in rows]
    text = "\n".join(table) + "\n"
    print("\n" + text)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    previous = output.read_text() if output.exists() else "# Benchmarks (`make bench`)\n\n"
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(previous.rstrip() + "\n\n" + text)
    os.replace(tmp, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
