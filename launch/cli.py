"""The ``lmforge`` command line.

    lmforge run CONFIG [--section.key=value ...] [--dry-run] [--resume auto]
    lmforge prepare CONFIG [...]
    lmforge train CONFIG [--resume auto|none|CHECKPOINT] [...]
    lmforge export CONFIG [--checkpoint DIR] [--out DIR] [...]
    lmforge generate CONFIG [--checkpoint DIR] [...]
    lmforge submit slurm|ray|local CONFIG [...]   (see lmforge.launch.submit)
    lmforge eval EXPORT|RUN_DIR --tasks name=path ... [--json] [--limit N]   (launch.eval)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from lmforge.launch.config import PREPARE_SECTIONS, ConfigError, RunConfig, load_config
from lmforge.launch.eval.command import build_eval_parser
from lmforge.launch.export import ExportError
from lmforge.launch.redact import redact, redact_text
from lmforge.launch.rundir import RunDir
from lmforge.launch.submit import allocation_overrides, build_submit_parser, dispatch_submit
from lmforge.launch.train.errors import CheckpointError, UnsafeCheckpointError
from lmforge.pipeline.folder_lock import FolderLocked

COMMANDS = {
    "run": "prepare data, train, export and generate: the whole job (or every stage of a "
           "stage graph)",
    "prepare": "shard and tokenize the corpus (Ray → sentencepiece → WebDataset)",
    "train": "train on prepared shards with DeepSpeed",
    "export": "write a verified Hugging Face folder from a checkpoint",
    "generate": "generate text from a checkpoint",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmforge",
        description="Pretrain language models: Ray data pipeline, DeepSpeed ZeRO, MLflow.",
        epilog="Any config key can be overridden as --section.key=value, "
        "e.g. --train.max_steps=50 --model.n_layers=2.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("config", type=Path, help="run config YAML (e.g. configs/tiny.yaml)")
        cmd.add_argument("--dry-run", action="store_true",
                         help="print the resolved config, parameter count and DeepSpeed JSON")
        if name in ("run", "train"):
            cmd.add_argument("--resume", nargs="?", const="auto", default=None,
                             help="resume: auto (newest complete checkpoint, the default when "
                                  "the flag is given bare), none, or a checkpoint folder")
        if name in ("export", "generate"):
            cmd.add_argument("--checkpoint", default=None,
                             help="checkpoint folder (default: the newest complete one)")
        if name == "export":
            cmd.add_argument("--out", default=None, help="export folder (default <run_dir>/export)")
    build_submit_parser(sub)
    build_eval_parser(sub)
    return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if bad:
        parser.error(f"unrecognised arguments {bad}; overrides look like --section.key=value")
    return args, extra


def dry_run(cfg: RunConfig) -> None:
    import yaml

    from lmforge.launch.config.deepspeed import build_deepspeed_config
    from lmforge.model import parameter_count

    print("# resolved config (secrets shown as ***)")
    print(yaml.safe_dump(redact(cfg.to_dict()), sort_keys=False, allow_unicode=True))
    if cfg.model.vocab_size is not None:
        print(f"# parameters: {parameter_count(cfg.model):,}")
    else:
        print("# parameters: unknown until the tokenizer is loaded (model.vocab_size unset)")
    print("# DeepSpeed config")
    ds_config = build_deepspeed_config(
        cfg.train, cfg.deepspeed, cfg.world_size, cfg.launch.resolved_backend()
    )
    print(json.dumps(redact(ds_config), indent=2))
    from lmforge.launch.memory_plan import format_memory_plan

    print(format_memory_plan(cfg))
    if cfg.data.mix:
        from lmforge.launch.config.run_config import steps_for_tokens
        from lmforge.pipeline.loader.draws import format_draws, plan_draws
        from lmforge.pipeline.loader.mix import Mix

        mix = Mix(cfg.data.mix)
        train = steps_for_tokens(cfg.train, cfg.world_size, mix.seq_len)
        samples = train.max_steps * train.sequences_per_step(cfg.world_size)
        print(format_draws(mix, plan_draws(mix, samples, cfg.seed, cfg.data.loader)))


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "eval":  # scores an export: no run config to load
            from lmforge.launch.eval.command import run_eval

            sys.exit(run_eval(args, overrides))
        # Preparing data reads only the data and tokenizer sections: a model or training
        # setting that does not fit them yet must not stop it.
        sections = PREPARE_SECTIONS if args.command == "prepare" else None
        cfg = load_config(args.config, overrides + allocation_overrides(args), sections)
        if args.dry_run:
            if cfg.stages and args.command == "run":
                from lmforge.launch.memory_plan import format_memory_plan
                from lmforge.launch.stages.graph import describe_graph

                print(describe_graph(cfg))
                print(format_memory_plan(cfg) + "  (the top-level sections; stages may differ)")
                return
            dry_run(cfg)
            return
        code = dispatch(args, cfg)
    except ConfigError as err:
        print(f"lmforge: config error: {redact_text(str(err))}", file=sys.stderr)
        sys.exit(2)
    except (FileNotFoundError, ValueError, ExportError, CheckpointError,
            UnsafeCheckpointError, FolderLocked) as err:
        print(f"lmforge: {redact_text(str(err))}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


def dispatch(args: argparse.Namespace, cfg: RunConfig) -> int:
    from lmforge.launch import commands

    if cfg.stages and args.command in ("train", "export", "generate"):
        raise ConfigError(
            f"stages: {args.config} is a stage graph; run it with `lmforge run`, or give "
            f"`lmforge {args.command}` one stage's config (<run_dir>/stages/<ii>-<name>/"
            "config.yaml)"
        )
    if args.command == "run":  # every run is a stage graph (a plain config: one stage)
        from lmforge.launch.stages.runner import run_graph

        return run_graph(cfg, resume=args.resume).exit_code
    if args.command == "prepare":
        print(f"manifest: {commands.prepare_data(cfg)}")
        return 0
    if args.command == "train":
        run_id = RunDir.of(cfg.run_dir).read_run_id() if args.resume else None
        return commands.train(cfg, resume=args.resume, run_id=run_id)
    if args.command == "export":
        print(f"export: {commands.export(cfg, args.checkpoint, args.out)}")
        return 0
    if args.command == "generate":
        commands.generate(cfg, args.checkpoint)
        return 0
    if args.command == "submit":
        return dispatch_submit(args, cfg)
    raise AssertionError(args.command)


if __name__ == "__main__":
    main()
