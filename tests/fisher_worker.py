"""One rank of the distributed Fisher test: a tiny Llama under DeepSpeed ZeRO-3, gloo on CPU.

    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_addr 127.0.0.1 --master_port 29512 \
        tests/fisher_worker.py --out /tmp/fisher_out

Every rank builds the same random model and the same examples, takes examples
rank::world, checks the weights really are partitioned, runs the Fisher pass through
``make_fisher_engine`` + ``engine.backward``, and writes ``rank{r}.json`` (one profile
per form/labels case). Also imported by the tests for :func:`make_batches`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

CASES = (("parameter", "empirical"), ("parameter", "sampled"), ("activation", "empirical"))


def make_examples(num_examples: int, vocab: int = 256, seed: int = 0, num_candidates: int = 4) -> list[dict]:
    """Random prompts of varied length; the answer letter is the last token (two for every third example).

    Rows as ``layerwise_dist.data.tokenize_examples`` writes them (lists of ints), for ``data.collate``.
    """
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n in range(num_examples):
        length = int(torch.randint(6, 15, (1,), generator=gen))
        ids = torch.randint(3, vocab, (length,), generator=gen)
        candidates = torch.randperm(vocab - 3, generator=gen)[:num_candidates] + 3
        target = int(torch.randint(0, num_candidates, (1,), generator=gen))
        ids[-1] = candidates[target]
        labels = torch.full((length,), -100, dtype=torch.long)
        labels[-1] = ids[-1]
        answer_pos = length - 2
        if n % 3 == 2:  # a two-token answer
            labels[-2] = ids[-2]
            answer_pos = length - 3
        examples.append(
            {
                "input_ids": ids.tolist(),
                "attention_mask": [1] * length,
                "labels": labels.tolist(),
                "answer_pos": answer_pos,
                "target_index": target,
                "candidate_token_ids": candidates.tolist(),
            }
        )
    return examples


def make_batches(num_examples: int, batch_size: int, seed: int = 0, vocab: int = 256) -> list[dict]:
    from layerwise_dist.data import collate

    ex = make_examples(num_examples, vocab=vocab, seed=seed)
    return [collate(ex[i : i + batch_size], 0) for i in range(0, len(ex), batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-examples", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--nf4-model", default="", help="a saved tiny model folder to load 4-bit NF4 under ZeRO-3")
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()

    import torch._dynamo  # noqa: F401  (before any deepspeed.zero.Init)

    from layerwise_dist import distributed
    from layerwise_dist.data import collate
    from layerwise_dist.fisher import compute_fisher_profile, make_fisher_engine
    from layerwise_dist.models.tiny import tiny_llama

    distributed.init_distributed()
    rank, world = distributed.rank(), distributed.world_size()
    ds_config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    if args.nf4_model:
        from layerwise_dist.config import TeacherConfig
        from layerwise_dist.models.teacher import load_teacher

        # Built under HfDeepSpeedConfig: the packed 4-bit weights are partitioned as they load.
        model = load_teacher(TeacherConfig(model=args.nf4_model, quantization="nf4", placement="zero3"), ds_config)
    else:
        model = tiny_llama(seed=0)
    engine = make_fisher_engine(model, ds_config)
    params = list(engine.module.parameters())
    partitioned = all(hasattr(p, "ds_numel") and p.numel() == 0 for p in params)
    shard = sum(p.ds_tensor.numel() for p in params)
    full = sum(p.ds_numel for p in params)
    assert partitioned and shard * world <= full + world * len(params), (partitioned, shard, full)
    norm_before = {n: p.ds_tensor.detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}

    # The same examples on every rank; rank r takes r::world (equal batch counts: ZeRO-3 gathers collectively).
    examples = make_examples(args.num_examples)[rank::world]
    batches = [collate(examples[i : i + args.batch_size], 0) for i in range(0, len(examples), args.batch_size)]
    result = {"world": world, "partition": {"shard_numel": shard, "full_numel": full}, "profiles": {}}
    for form, labels in CASES:
        profile = compute_fisher_profile(engine, batches, form=form, labels=labels, seed=3, progress=False)
        result["profiles"][f"{form}/{labels}"] = profile.to_dict()
    unchanged = all(
        torch.equal(norm_before[n], p.ds_tensor) for n, p in engine.module.named_parameters() if n in norm_before
    )
    result["norms_unchanged"] = unchanged
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.barrier()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        print("fisher_worker done", json.dumps(result["partition"]))


if __name__ == "__main__":
    main()
