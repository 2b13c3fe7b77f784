"""Recipe: the layerwise Fisher profile of the teacher on training prompts, over all ranks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..config import ConfigError, RunConfig
from ..data.errors import DataError
from ..data.sampler import RankSampler, load_batch
from ..distributed import barrier, get_logger, is_main
from ..run_metadata import log_fisher_profile
from .session import RunSession

log = get_logger()


def needs_fisher(cfg: RunConfig) -> bool:
    """The student's layers or its alignment weights come from the profile."""
    return cfg.student.selection == "fisher-topk" or cfg.distill.layer_weighting == "fisher"


class FisherRecipe:
    """``setup`` (a given or resumed profile, else teacher engine and batches) -> ``run`` -> ``save``."""

    def __init__(self, session: RunSession) -> None:
        self.session = session
        self.cfg = session.cfg
        self.profile: Any = None
        self.measured = False

    def setup(self) -> FisherRecipe:
        self.profile = self._setup_existing_profile()
        if self.profile is None:
            self.engine = self.session.teacher.get(for_fisher=True)
            self.batches = self._setup_data()
        return self

    def _setup_existing_profile(self) -> Any:
        from ..fisher import FisherProfile

        cfg = self.cfg
        if cfg.fisher.profile:
            path = Path(cfg.fisher.profile)
            if not path.is_file():
                raise FileNotFoundError(f"fisher.profile: {path} does not exist")
            log.info("using the Fisher profile in %s", path)
            return FisherProfile.load_json(path)
        saved = self.session.out / "fisher_profile.json"
        if cfg.train.resume and saved.is_file():
            # A resumed run must rebuild the very student its checkpoint holds: same profile, same layers.
            log.info("resume: reusing the Fisher profile of this run in %s", saved)
            return FisherProfile.load_json(saved)
        return None

    def _setup_data(self) -> list[dict[str, Any]]:
        data = self.session.examples("train")
        n = min(self.cfg.fisher.num_examples, len(data))
        try:  # equal batch counts on every rank: the ZeRO-3 forwards and backwards are collective
            sampler = RankSampler.for_rank(n, self.cfg.fisher.batch_size)
        except DataError as e:
            raise ConfigError(f"fisher.num_examples / fisher.batch_size: {e}") from None
        return [load_batch(data, indices, self.session.pad_token_id) for indices in sampler]

    def run(self) -> Any:
        if self.profile is not None:
            return self.profile
        from ..fisher import compute_fisher_profile

        cfg = self.cfg
        t0 = time.perf_counter()
        self.profile = compute_fisher_profile(
            self.engine,
            self.batches,
            form=cfg.fisher.form,
            labels=cfg.fisher.labels,
            seed=cfg.fisher.seed,
            model_id=cfg.teacher.model,
            linear_method=cfg.fisher.linear_method,
            progress=True,
        )
        self.session.timings["fisher_s"] = time.perf_counter() - t0
        self.measured = True
        return self.profile

    def save(self) -> Any:
        """Profile JSON + chart (rank 0), tracker metrics; the profile goes into the run's results."""
        session = self.session
        if self.measured and is_main():
            out = session.out
            self.profile.save_json(out / "fisher_profile.json")
            self.profile.plot(out / "fisher_profile.png")
            # one chart and one table (fisher/ artifacts), two depth-share scalars: not one metric per layer
            log_fisher_profile(session.tracker, self.profile, out)
            log.info("Fisher profile:\n%s", self.profile.summary())
        barrier()
        session.results["fisher"] = self.profile.to_dict()
        return self.profile
