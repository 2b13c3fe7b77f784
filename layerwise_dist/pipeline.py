"""The whole job as stages, run on every rank of one process group.

``fisher``   profile of the teacher (4-bit, ZeRO-3 partitioned) on training prompts
``distill``  student from chosen teacher layers, trained by a DeepSpeed engine
``evaluate`` teacher and student on the test split: HR@K, NDCG@K, MRR, latency, memory

Each stage writes into ``cfg.output_dir`` (profile JSON/PNG, student folder,
metrics JSON, report) so a later stage or a later run can start from it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, RunConfig
from .distributed import barrier, get_logger, init_distributed, is_main, rank, world_size
from .models.teacher import load_teacher, load_tokenizer, resolve_model_dir

log = get_logger()

STAGES = ("fisher", "distill", "evaluate")


@dataclass
class Context:
    """What the stages share inside one process: config, tokenizer, data, teacher engine, tracker."""

    cfg: RunConfig
    tokenizer: Any
    splits: Any
    ds_config: dict[str, Any]
    tracker: Any
    teacher_engine: Any = None
    datasets: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    def examples(self, split: str) -> Any:
        """Tokenized examples of a split (cached by HF datasets across runs)."""
        if split not in self.datasets:
            from .data import build_examples, tokenize_examples

            examples = build_examples(self.splits, split, self.cfg.data, self.tokenizer)
            if split in ("test", "valid") and self.cfg.eval.max_examples:
                examples = examples[: self.cfg.eval.max_examples]
            cache = self.cfg.data.cache_dir or None
            self.datasets[split] = tokenize_examples(examples, self.tokenizer, self.cfg.data, cache_dir=cache)
        return self.datasets[split]


def needs_fisher(cfg: RunConfig) -> bool:
    return cfg.student.selection == "fisher-topk" or cfg.distill.layer_weighting == "fisher"


def setup(cfg: RunConfig) -> Context:
    from .data import load_splits
    from .tracking import make_tracker
    from .trainer import resolve_ds_config

    init_distributed()
    torch.manual_seed(cfg.train.seed)
    ds_config = resolve_ds_config(cfg.ds_config, cfg)
    out = Path(cfg.output_dir)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        (out / "ds_config.resolved.json").write_text(json.dumps(ds_config, indent=2))
    barrier()
    tokenizer = load_tokenizer(cfg.teacher)
    splits = load_splits(cfg.data, progress=is_main())
    tracker = make_tracker(cfg.tracking, out.parent, run_name=cfg.tracking.run_name or _run_name(cfg), rank=rank())
    tracker.log_params(cfg.to_dict())
    tracker.set_tags({"world_size": str(world_size()), "device": "cuda" if torch.cuda.is_available() else "cpu"})
    if is_main():
        tracker.log_artifact(out / "config.yaml")
        tracker.log_artifact(out / "ds_config.resolved.json")
    log.info(
        "run %s: %d ranks, data %s (%s users), teacher %s",
        out,
        world_size(),
        cfg.data.source,
        len(splits.test),
        cfg.teacher.model,
    )
    return Context(cfg=cfg, tokenizer=tokenizer, splits=splits, ds_config=ds_config, tracker=tracker)


def _run_name(cfg: RunConfig) -> str:
    return (
        f"{Path(cfg.output_dir).name}-{cfg.student.num_layers}L-{cfg.student.selection}-{cfg.distill.layer_weighting}"
    )


def _equal_shard(n: int, per_rank_multiple: int = 1) -> range:
    """This rank's contiguous share of n items; every rank gets the same count (collective forwards)."""
    per_rank = n // world_size()
    per_rank -= per_rank % per_rank_multiple
    if per_rank == 0:
        raise ConfigError(f"{n} examples cannot give each of {world_size()} ranks a batch of {per_rank_multiple}")
    return range(rank() * per_rank, (rank() + 1) * per_rank)


def teacher_engine(ctx: Context, for_fisher: bool) -> Any:
    """The frozen teacher, ZeRO-3 partitioned (an engine) or replicated (a module)."""
    if ctx.teacher_engine is not None:
        return ctx.teacher_engine
    cfg = ctx.cfg
    import deepspeed

    from .fisher import make_fisher_engine
    from .trainer import resolve_ds_config

    t0 = time.perf_counter()
    ds = resolve_ds_config(cfg.ds_config, cfg, for_training=False)
    model = load_teacher(cfg.teacher, ds if cfg.teacher.placement == "zero3" else None)
    if cfg.teacher.placement == "zero3" and for_fisher:
        # ZeRO-3 refuses loss.backward(); an engine whose norms train at lr 0 gives engine.backward.
        engine = make_fisher_engine(model, ds)
    elif cfg.teacher.placement == "zero3":
        engine, *_ = deepspeed.initialize(model=model, config=ds)
    else:
        engine = model.to(_device())
    ctx.timings["teacher_load_s"] = time.perf_counter() - t0
    ctx.info["teacher"] = describe_placement(model)
    log.info("teacher placement: %s", ctx.info["teacher"])
    ctx.teacher_engine = engine
    return engine


def describe_placement(model: torch.nn.Module) -> dict[str, Any]:
    """How the teacher is held on this rank: quantized modules, ZeRO-3 partitioning, local share."""
    quantized = sorted(
        {type(m).__name__ for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}
    )
    params = list(model.parameters())
    partitioned = bool(params) and all(hasattr(p, "ds_id") for p in params)
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    return {
        "quantized_modules": quantized,
        "zero3_partitioned": partitioned,
        "local_param_fraction": round(local / max(1, full), 4),
        "world_size": world_size(),
    }


def _device() -> torch.device:
    from .distributed import device

    return device()


# ------------------------------------------------------------------ fisher
def run_fisher(ctx: Context) -> Any:
    from .data import collate
    from .fisher import FisherProfile, compute_fisher_profile

    cfg = ctx.cfg
    if cfg.fisher.profile:
        path = Path(cfg.fisher.profile)
        if not path.is_file():
            raise FileNotFoundError(f"fisher.profile: {path} does not exist")
        log.info("using the Fisher profile in %s", path)
        return FisherProfile.load_json(path)
    saved = ctx.out / "fisher_profile.json"
    if cfg.train.resume and saved.is_file():
        # A resumed run must rebuild the very student its checkpoint holds: same profile, same layers.
        log.info("resume: reusing the Fisher profile of this run in %s", saved)
        return FisherProfile.load_json(saved)
    engine = teacher_engine(ctx, for_fisher=True)
    data = ctx.examples("train")
    n = min(cfg.fisher.num_examples, len(data))
    bs = cfg.fisher.batch_size
    mine = list(_equal_shard(n, bs))
    batches = [
        collate([data[i] for i in mine[j : j + bs]], ctx.tokenizer.pad_token_id) for j in range(0, len(mine), bs)
    ]
    t0 = time.perf_counter()
    profile = compute_fisher_profile(
        engine,
        batches,
        form=cfg.fisher.form,
        labels=cfg.fisher.labels,
        seed=cfg.fisher.seed,
        model_id=cfg.teacher.model,
        linear_method=cfg.fisher.linear_method,
        progress=True,
    )
    ctx.timings["fisher_s"] = time.perf_counter() - t0
    if is_main():
        profile.save_json(ctx.out / "fisher_profile.json")
        profile.plot(ctx.out / "fisher_profile.png")
        ctx.tracker.log_artifact(ctx.out / "fisher_profile.json")
        ctx.tracker.log_artifact(ctx.out / "fisher_profile.png")
        ctx.tracker.log_metrics({f"fisher/layer_{i:02d}": float(s) for i, s in enumerate(profile.scores)})
        top, bottom = profile.depth_shares(0.3)
        ctx.tracker.log_metrics({"fisher/top30_share": top, "fisher/bottom30_share": bottom})
        log.info("Fisher profile:\n%s", profile.summary())
    barrier()
    return profile


# ------------------------------------------------------------------ distill
def run_distill(ctx: Context, profile: Any = None) -> Path:
    from transformers import AutoConfig

    from .losses import DistillationLoss, expose_layer_outputs
    from .models.student import build_student, select_layers, validate_layer_map
    from .trainer import DistillationRunner
    from .weighting import layer_weights

    cfg = ctx.cfg
    teacher_dir = resolve_model_dir(cfg.teacher)
    n_teacher = AutoConfig.from_pretrained(str(teacher_dir)).num_hidden_layers
    scores = list(profile.scores) if profile is not None else None
    if cfg.student.model:
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(cfg.student.model, dtype=torch.float32)
        if not cfg.student.layer_map:
            raise ConfigError("student.model needs student.layer_map (student layer -> teacher layer)")
        layer_map = list(cfg.student.layer_map)
    else:
        layers = select_layers(
            cfg.student.selection, n_teacher, cfg.student.num_layers, fisher_scores=scores, layers=cfg.student.layers
        )
        student, layer_map = build_student(teacher_dir, layers, teacher_name=cfg.teacher.model)
        if cfg.student.layer_map:
            layer_map = list(cfg.student.layer_map)
    validate_layer_map(layer_map, student.config.num_hidden_layers, n_teacher)
    student.config.use_cache = False
    student.config._attn_implementation = ctx_attn(cfg)
    weights = layer_weights(cfg.distill.layer_weighting, layer_map, scores, temperature=cfg.distill.weight_temperature)
    log.info("student: teacher layers %s, alignment weights %s", layer_map, [round(w, 4) for w in weights])
    ctx.tracker.log_params(
        {"resolved.student_layers": layer_map, "resolved.layer_weights": [round(w, 5) for w in weights]}
    )
    if is_main():
        (ctx.out / "layer_weights.json").write_text(json.dumps({"layer_map": layer_map, "weights": weights}, indent=2))

    teacher = teacher_engine(ctx, for_fisher=needs_fisher(cfg) and not cfg.fisher.profile)
    # Raw decoder-layer outputs on both sides (HF puts the final norm's output last).
    expose_layer_outputs(student)
    expose_layer_outputs(teacher.module if hasattr(teacher, "module") else teacher)
    loss_fn = DistillationLoss(cfg.distill, weights, layer_map, student.config.hidden_size, _hidden_size(teacher_dir))
    train = ctx.examples("train")
    valid = ctx.examples("valid")
    if cfg.train.valid_examples:
        valid = valid.select(range(min(len(valid), cfg.train.valid_examples)))
    runner = DistillationRunner(
        cfg,
        student,
        teacher,
        loss_fn,
        train,
        ctx.tokenizer.pad_token_id,
        ctx.ds_config,
        valid_data=valid,
        tracker=ctx.tracker,
        tokenizer=ctx.tokenizer,
    ).setup()
    t0 = time.perf_counter()
    state = runner.train()
    ctx.timings["distill_s"] = time.perf_counter() - t0
    if is_main():
        (ctx.out / "train_history.json").write_text(json.dumps(state.history, indent=2))
        ctx.tracker.log_artifact(ctx.out / "train_history.json")
    if state.history:
        first, last = state.history[0]["total"], state.history[-1]["total"]
        log.info("distillation loss %.4f -> %.4f over %d steps", first, last, len(state.history))
    return ctx.out / "student"


def ctx_attn(cfg: RunConfig) -> str:
    from .models.teacher import select_attn_implementation

    return select_attn_implementation(cfg.teacher.attn_implementation)


def _hidden_size(folder: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder)).hidden_size


# ------------------------------------------------------------------ evaluate
def run_evaluate(ctx: Context, student_dir: Path | None = None, with_teacher: bool = True) -> dict[str, Any]:
    """Score teacher and student on the test split; latency and memory measured per model.

    Both models are evaluated replicated (each rank holds a whole model and scores
    its own share of the examples, sums all-reduced): that is how a recommender
    is served, and it keeps the latency figures free of ZeRO-3 all-gathers.
    """

    from .data import collate
    from .evaluation import compare, evaluate_model, measure_cost

    cfg = ctx.cfg
    data = ctx.examples(cfg.eval.split)
    bs = cfg.eval.batch_size
    n = len(data)
    per_rank = -(-n // world_size())
    mine = list(range(rank() * per_rank, min(n, (rank() + 1) * per_rank)))
    batches = [
        collate([data[i] for i in mine[j : j + bs]], ctx.tokenizer.pad_token_id) for j in range(0, len(mine), bs)
    ]
    timed = batches[: cfg.eval.latency_batches + 1]  # one warm-up batch, then the timed ones
    warmup = 1 if len(timed) > 1 else 0
    results: dict[str, Any] = {"config": {"examples": n, "ranks": world_size(), "batch_size": bs}}
    models: list[tuple[str, Any]] = []
    if with_teacher:
        replicated = type(cfg.teacher)(**{**cfg.teacher.__dict__, "placement": "replicate"})
        models.append(("teacher", lambda: load_teacher(replicated).to(_device())))
    if student_dir is not None:
        if not (Path(student_dir) / "config.json").exists():
            raise FileNotFoundError(f"no student model folder at {student_dir} (run the distill stage first)")
        quant = (
            cfg.teacher.quantization if cfg.eval.student_quantization == "teacher" else cfg.eval.student_quantization
        )
        served = type(cfg.teacher)(
            **{**cfg.teacher.__dict__, "model": str(student_dir), "quantization": quant, "placement": "replicate"}
        )
        results["student_quantization"] = quant
        models.append(("student", lambda: load_teacher(served).to(_device())))
    for name, load in models:
        model = load()
        t0 = time.perf_counter()
        metrics = evaluate_model(model, batches, cfg.eval.ks, progress=True)
        ctx.timings[f"eval_{name}_s"] = time.perf_counter() - t0
        cost = measure_cost(model, timed, warmup=warmup)
        results[name] = {**metrics, **cost}
        ctx.tracker.log_metrics({f"{name}/{k}": v for k, v in results[name].items() if isinstance(v, (int, float))})
        log.info("%s: %s", name, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        del model
    if "teacher" in results and "student" in results:
        results["comparison"] = compare(results["teacher"], results["student"])
        ctx.tracker.log_metrics({"comparison": results["comparison"]})
    return results


# ------------------------------------------------------------------ whole run
def run(cfg: RunConfig, stages: tuple[str, ...] = STAGES, evaluate_teacher: bool = True) -> dict[str, Any]:
    """Run the given stages in order on this rank; returns the results on every rank."""
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage {unknown[0]!r} (stages: {', '.join(STAGES)})")
    t_start = time.perf_counter()
    ctx = setup(cfg)
    results: dict[str, Any] = {}
    status = "FAILED"
    try:
        profile = None
        if "fisher" in stages or ("distill" in stages and needs_fisher(cfg)):
            profile = run_fisher(ctx)
            results["fisher"] = profile.to_dict()
        student_dir = None
        if "distill" in stages:
            student_dir = run_distill(ctx, profile)
            results["student_dir"] = str(student_dir)
        elif (ctx.out / "student" / "config.json").exists():
            student_dir = ctx.out / "student"
        if "evaluate" in stages:
            results.update(run_evaluate(ctx, student_dir, with_teacher=evaluate_teacher))
        ctx.timings["total_s"] = time.perf_counter() - t_start
        results["timings"] = ctx.timings
        results["setup"] = ctx.info
        if is_main():
            _write_outputs(ctx, results)
        status = "FINISHED"
        return results
    finally:
        ctx.tracker.end(status)


def _write_outputs(ctx: Context, results: dict[str, Any]) -> None:
    from .report import results_table, write_report

    out = ctx.out
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    ctx.tracker.log_artifact(out / "results.json")
    if "teacher" in results or "student" in results:
        md, png = write_report(results, out)
        ctx.tracker.log_artifact(md)
        ctx.tracker.log_artifact(png)
        print("\n" + results_table(results))
        print(f"\nreport: {md}\nchart:  {png}")
    from .tracking import mlflow_ui_command

    if ctx.cfg.tracking.enabled:
        run_id = getattr(ctx.tracker, "run_id", None)
        print(f"MLflow run: {run_id}  (open the UI: {mlflow_ui_command(out.parent)})")
