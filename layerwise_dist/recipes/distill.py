"""Recipe: the student from chosen teacher layers, distilled under a DeepSpeed engine."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..distributed import destroy_engine, get_logger, is_main
from ..preflight import check_student_choice
from .fisher import FisherRecipe, needs_fisher
from .session import RunSession

log = get_logger()

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def teacher_identity(t: Any) -> str:
    """What a teacher cache is keyed on: the teacher, its quantization and, for a tiny one, its shape and seed.

    A local folder (an adapted, merged teacher) counts by its contents, not its path: ``config.json`` and, per
    weight file, its name, size and 64 chunks of 64 KiB spread over it. The cache is then recognised from
    another working directory or output folder, and refused for a teacher trained again into the same
    folder (its weights differ in every chunk). A registry name or hub id counts as written.
    """
    import hashlib

    folder = Path(t.model)
    if folder.is_dir():
        h = hashlib.blake2b(digest_size=16)
        for f in sorted(folder.iterdir()):
            if not f.is_file() or not (f.name == "config.json" or f.suffix in _WEIGHT_SUFFIXES):
                continue
            size = f.stat().st_size
            h.update(f"{f.name}:{size};".encode())
            with open(f, "rb") as fh:
                if f.name == "config.json":
                    h.update(fh.read())
                    continue
                chunk = 1 << 16
                for i in range(64):
                    fh.seek(max(0, size - chunk) * i // 63)
                    h.update(fh.read(chunk))
        model = f"folder:{h.hexdigest()}"
    else:
        model = t.model
    identity = f"{model}|{t.gguf_file}|{t.quantization}"
    if t.model.startswith("tiny"):
        identity += f"|{t.tiny_layers}x{t.tiny_hidden}|seed{t.tiny_seed}"
    return identity


class DistillRecipe:
    """``setup`` (profile, student, layer weights, loss, engine) -> ``train`` -> ``save``."""

    def __init__(self, session: RunSession, profile: Any = None, cache_layers: list[int] | None = None) -> None:
        self.session = session
        self.cfg = session.cfg
        self.profile = profile
        # distill.teacher_cache: the teacher layers it stores (the ablation's union over its cells; default: ours)
        self.cache_layers = cache_layers

    def setup(self) -> DistillRecipe:
        from transformers import AutoConfig

        check_student_choice(self.cfg)
        self.teacher_config = AutoConfig.from_pretrained(str(self._teacher_dir()))
        if self.profile is None and needs_fisher(self.cfg):
            fisher = FisherRecipe(self.session).setup()
            fisher.run()
            self.profile = fisher.save()
        self.student, self.layer_map = self._setup_student()
        self.weights = self._setup_weights()
        self.runner = self._setup_runner()
        return self

    def _teacher_dir(self) -> Path:
        from ..models.teacher import resolve_model_dir

        return resolve_model_dir(self.cfg.teacher)

    def _setup_student(self) -> tuple[Any, list[int]]:
        from ..models.student import build_student, select_layers, validate_layer_map
        from ..models.teacher import select_attn_implementation

        cfg = self.cfg.student
        n_teacher = self.teacher_config.num_hidden_layers
        if cfg.model:
            from transformers import AutoModelForCausalLM

            if not cfg.layer_map:
                raise ConfigError("student.model needs student.layer_map (student layer -> teacher layer)")
            student = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
            layer_map = list(cfg.layer_map)
        else:
            scores = list(self.profile.scores) if self.profile is not None else None
            layers = select_layers(cfg.selection, n_teacher, cfg.num_layers, fisher_scores=scores, layers=cfg.layers)
            student, layer_map = build_student(self._teacher_dir(), layers, teacher_name=self.cfg.teacher.model)
            if cfg.layer_map:
                layer_map = list(cfg.layer_map)
        validate_layer_map(layer_map, student.config.num_hidden_layers, n_teacher)
        from ..data.sources import category_picks_files

        # The saved student carries the prompt settings it was trained with: recommend and evaluate reuse them.
        info = dict(getattr(student.config, "layerwise_dist", None) or {})
        info["prompt"] = self.cfg.data.prompt_settings()
        splits = getattr(self.session, "splits", None)
        if splits is not None and not category_picks_files(self.cfg.data):
            info["prompt"]["category"] = splits.category  # the category the prompts named (e.g. an llmrank folder's)
        student.config.layerwise_dist = info
        student.config.use_cache = False
        student.config._attn_implementation = select_attn_implementation(self.cfg.model_attn_implementation())
        return student, layer_map

    def _setup_weights(self) -> list[float]:
        from ..weighting import layer_weights

        cfg = self.cfg.distill
        scores = list(self.profile.scores) if self.profile is not None else None
        weights = layer_weights(cfg.layer_weighting, self.layer_map, scores, temperature=cfg.weight_temperature)
        log.info("student: teacher layers %s, alignment weights %s", self.layer_map, [round(w, 4) for w in weights])
        self.session.tracker.log_params(
            {"resolved.student_layers": self.layer_map, "resolved.layer_weights": [round(w, 5) for w in weights]}
        )
        if is_main():
            self.session.results["student_layers"] = {
                "selection": self.cfg.student.selection,
                "weighting": cfg.layer_weighting,
                "layer_map": list(self.layer_map),
                "weights": [float(w) for w in weights],
            }
            (self.session.out / "layer_weights.json").write_text(
                json.dumps({"layer_map": self.layer_map, "weights": weights}, indent=2)
            )
        return weights

    def _setup_runner(self) -> Any:
        from ..losses import distillation_loss, expose_layer_outputs
        from ..trainer import DistillationRunner

        session, cfg = self.session, self.cfg
        teacher = session.teacher.get(for_fisher=needs_fisher(cfg) and not cfg.fisher.profile)
        # Raw decoder-layer outputs on both sides (HF puts the final norm's output last).
        expose_layer_outputs(self.student)
        expose_layer_outputs(session.teacher.module)
        loss_fn = distillation_loss(  # the formulation's objective (listwise letters or pointwise titles)
            cfg, self.weights, self.layer_map, self.student.config.hidden_size, self.teacher_config.hidden_size
        )
        cache = self._teacher_cache() if cfg.distill.teacher_cache else None
        valid = session.examples("valid")
        t = cfg.train
        if t.valid_examples:  # the loss's users, and the ranked ones if more (the runner tells them apart)
            valid = valid.select(range(min(len(valid), max(t.valid_examples, t.valid_rank_examples))))
        return DistillationRunner(
            cfg,
            self.student,
            teacher,
            loss_fn,
            session.examples("train"),
            session.pad_token_id,
            session.ds_config,
            valid_data=valid,
            tracker=session.tracker,
            tokenizer=session.tokenizer,
            teacher_cache=cache,
        ).setup()

    def _teacher_cache(self) -> Any:
        from ..teacher_cache import TeacherCache

        cfg = self.cfg
        identity = teacher_identity(cfg.teacher)
        layers = sorted(set(self.cache_layers or []) | set(self.layer_map))
        return TeacherCache(
            cfg.distill.teacher_cache,
            layers,
            self.teacher_config.num_hidden_layers,
            topk=cfg.distill.cache_topk,
            temperature=cfg.distill.temperature,
            formulation=cfg.data.formulation,
            teacher=identity,
            dtype=cfg.distill.cache_dtype,
        ).open()

    def train(self) -> DistillRecipe:
        if self.runner.teacher_cache is not None:
            t0 = time.perf_counter()
            stats = self.runner.build_teacher_cache()
            self.session.timings["teacher_cache_s"] = time.perf_counter() - t0
            if is_main():
                self.session.results["teacher_cache"] = {
                    "folder": str(self.runner.teacher_cache.folder),
                    "layers": list(self.runner.teacher_cache.layers),
                    **self.runner.teacher_cache.settings,
                    "built_examples_rank0": int(stats["examples"]),
                    "written_bytes_rank0": int(stats["bytes"]),
                    "estimate_bytes_rank0": int(stats["estimate_bytes"]),
                }
        t0 = time.perf_counter()
        self.state = self.runner.train()
        self.session.timings["distill_s"] = time.perf_counter() - t0
        history = self.state.history
        if history:
            log.info(
                "distillation loss %.4f -> %.4f over %d steps", history[0]["total"], history[-1]["total"], len(history)
            )
        return self

    def release(self, keep_teacher: bool = False) -> None:
        """Free the student engine and (unless ``keep_teacher``: the next ablation cell distils from it)
        this rank's teacher, before evaluation loads the models it measures."""
        import gc

        runner = getattr(self, "runner", None)
        engine = getattr(runner, "engine", None)
        if engine is not None:
            destroy_engine(engine)
        self.runner = self.student = None
        if not keep_teacher:
            self.session.teacher.release()
        gc.collect()

    def save(self) -> Path:
        """The training history (the student folder and checkpoint were written by the loop)."""
        out = self.session.out
        if is_main():
            (out / "train_history.json").write_text(json.dumps(self.state.history, indent=2))
            self.session.tracker.log_artifact(out / "train_history.json")
        student_dir = out / "student"
        self.session.results["student_dir"] = str(student_dir)
        return student_dir
