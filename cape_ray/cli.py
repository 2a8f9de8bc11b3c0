"""`cape-ray train | runs | inspect | make-data | evaluate | plot | show` (also `python -m cape_ray`).

Every TrainConfig field is a flag, in both spellings (`--batch_size` and `--batch-size`). Invalid
values are reported in one line before Ray starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from typing import Optional, Sequence

from cape_ray.config import ConfigError, TrainConfig, read_config_file

HELP = {
    "name": "run name; rerunning with the same name and storage path resumes the run",
    "storage_path": "where runs are kept: a local/NFS directory or s3://bucket/prefix",
    "resume": "start from this checkpoint directory, or a run directory's newest valid checkpoint (used when "
              "the run has no checkpoint of its own yet)",
    "epochs": "number of epochs",
    "episodes_per_epoch": "training episodes per epoch, over all workers",
    "batch_size": "episodes per worker per micro-batch",
    "accumulation_steps": "micro-batches per optimizer step",
    "num_queries_per_episode": "query images per training episode",
    "num_shots": "support images per episode (1 or 5)",
    "val_episodes": "validation episodes per validation category",
    "early_stopping_patience": "stop after this many epochs without val_pck improvement (0 = never)",
    "checkpoint_every_steps": "also checkpoint every N optimizer steps inside an epoch (0 = off)",
    "data_root": "train on MP-100-format files in this directory instead of the built-in data",
    "mp100_split": "MP-100 split 1..5 (annotations/mp100_split{N}_{train,val,test}.json); also --split_id",
    "cache_dir": "where each node keeps the prepared MP-100 splits its workers share (a local disk; '~' is "
                 "expanded on the node; '' = no cache, every worker prepares its own copy)",
    "num_workers": "Ray Train workers: N, or MIN:MAX for an elastic run",
    "max_failures": "worker-group restarts allowed after failures (preemptions not counted)",
    "num_threads": "torch CPU threads per worker (fixed: it changes float rounding)",
    "keep": "checkpoints kept by (smoothed) val_pck, plus the latest and the best exports; 0 keeps every one",
    "keep_every": "also keep every N-th epoch's checkpoint (0 = off)",
    "pck_smoothing": "best-PCK selection and early stopping use the mean of the last N val_pck (1 = off)",
    "best_metrics": "one best export per METRIC:min|max, e.g. val_pck:max,val_loss:min,mpck:max",
    "verbose": "also print Ray's own output (per-report lines, worker set-up)",
    "address": "Ray cluster: local (a private instance), auto or HOST:PORT (attach); unset: RAY_ADDRESS, else "
               "the last `ray start` on this machine, else a private instance. One that does not answer is refused",
    "deterministic": "deterministic CUDA kernels, so that GPU runs and resumes are bitwise reproducible (unset: on "
                     "with --use_gpu; CPU training is deterministic either way)",
    "seed": "training randomness: initial weights, dropout, augmentation order (episodes draw from it by position)",
    "lr": "AdamW learning rate (linear warmup, then cosine decay to lr x --min_lr_ratio)",
    "weight_decay": "AdamW weight decay on weight matrices and kernels (not on norms, biases, the temperature)",
    "warmup_steps": "optimizer steps of linear LR warmup (steps of the layout the run began with)",
    "min_lr_ratio": "the cosine decays to lr x this at the end of the planned epochs",
    "grad_clip": "clip the gradient norm to this (0 = no clipping)",
    "early_stopping_min_delta": "a val_pck gain of at most this does not count as an improvement",
    "preemption_check_steps": "ask Ray about an imminent node preemption every N steps (0 = never)",
    "val_queries_per_episode": "queries per validation episode (MP-100: 15)",
    "augment": "random scale and rotation of training images (--no-augment: none)",
    "data": "builtin (procedural categories), builtin-hard (the harder preset) or mp100 (implied by --data_root)",
    "image_size": "the square crop every instance is resized to (unset: the model's default, 64 for cnn, 224 for vit)",
    "data_seed": "the built-in categories and the fixed validation episodes",
    "synthetic_instances_per_category": "instances per built-in category",
    "synthetic_canvas": "pixel size of a built-in image before cropping",
    "model": "cnn, vit, or package.module:function (a model of your own; see docs/models.md)",
    "backbone": "cnn: small or large; vit: any timm VisionTransformer name (unset: small / vit_small_patch14_dinov2)",
    "feature_dim": "width of the matching features and the keypoint decoder (unset: 64 for cnn, 256 for vit)",
    "refine_layers": "refinement (decoder) layers after the proposals (unset: 2 for cnn, 3 for vit)",
    "use_skeleton": "the category skeleton as a graph prior in the decoder (unset: off for cnn, on for vit)",
    "dropout": "dropout in the decoder",
    "model_kwargs": "more keyword arguments for the model's builder, as JSON, e.g. '{\"heads\": 4}'",
    "pretrained": "backbone weights: a .safetensors or torch file, or hf-hub:ORG/NAME / timm:NAME (read when the run "
                  "starts from scratch)",
    "freeze_backbone": "train none of the backbone (it runs without autograd)",
    "train_backbone_blocks": "--model vit: train only the last N transformer blocks (and the final norm)",
    "backbone_lr_mult": "the backbone's learning rate is lr x this",
    "grad_checkpointing": "recompute the backbone blocks' activations in the backward pass: less memory, same results",
    "precision": "fp32, bf16 or fp16 (autocast; fp16 with a gradient scaler)",
    "use_gpu": "one GPU per worker (NCCL)",
    "cpus_per_worker": "CPUs Ray reserves for each worker",
    "max_preemption_failures": "restarts after node preemptions (-1 = unlimited; they never use --max_failures)",
    "storage_retries": "retries of a failed checkpoint store, waiting 2, 4, 8, ... s; then Ray's restart budget",
    "sync_checkpoints": "store checkpoints on the training thread (default: a background writer, training pays only "
                        "for a copy in memory)",
    "progress": "bar (interactive), lines (job logs) or auto (a bar when stdout is a terminal)",
    "tracker": "mlflow, wandb, tensorboard or none; repeatable (see docs/tracking.md)",
    "tracking_uri": "MLflow tracking server (default: a file store in the run directory)",
    "lr_schedule": "a rerun with more --epochs: keep the planned schedule (the new epochs train at the floor LR) or "
                   "extend it (the cosine re-planned over all epochs)",
    "force": "accept a rerun or --resume whose flags change the run's math (recorded in its history)",
}


# More names for a config flag: `train --split_id N` trains on MP-100 split N.
FLAG_ALIASES = {"mp100_split": ("split_id",)}


class OneLineErrors(argparse.ArgumentParser):
    """Errors as one line that names the flag and the fix (the usage of 40 flags would bury it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}  (see {self.prog} --help)\n")


def _field_type(f: dataclasses.Field) -> type:
    hints = typing.get_type_hints(TrainConfig)
    hint = hints[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _both(name: str) -> list[str]:
    """--flag_name and --flag-name."""
    return [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])


def json_mapping(text: str) -> dict:
    """A flag's JSON object, e.g. --model_kwargs '{"heads": 4}'."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"heads\": 4}}': {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"heads\": 4}}', got {text!r}")
    return value


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="RUN.YAML",
                        help="read the training settings from a YAML file (keys: these flags' names); flags given "
                             "here override it. A run directory's config.yaml reproduces that run.")
    for f in dataclasses.fields(TrainConfig):
        kind = _field_type(f)
        names = [name for flag in (f.name, *FLAG_ALIASES.get(f.name, ())) for name in _both(flag)]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = HELP.get(f.name, "") + f" (default: {default})"
        if kind is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif f.name == "tracker":
            parser.add_argument(*names, dest=f.name, action="append", default=None, metavar="TRACKER",
                                choices=["mlflow", "wandb", "tensorboard", "none"], help=help_text)
        elif kind is dict:
            parser.add_argument(*names, dest=f.name, type=json_mapping, default=None, metavar="JSON", help=help_text)
        else:
            parser.add_argument(*names, dest=f.name, type=kind, default=None, metavar=f.name.upper(),
                                help=help_text)
    parser.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None,
                        help="same as --storage_path (the original pipeline's name for it)")


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TrainConfig:
    """--config's settings, overridden by the flags given on the command line, validated."""
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name) is not None}
    if args.output_dir is not None:
        if "storage_path" in flags and flags["storage_path"] != args.output_dir:
            parser.error("--output_dir and --storage_path name the same thing; give one of them")
        flags["storage_path"] = args.output_dir
    try:
        values = read_config_file(args.config) if getattr(args, "config", None) else {}
        return TrainConfig(**{**values, **flags})
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits


# ----------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    config = config_from_args(args, parser)
    from cape_ray import job  # Ray is imported only once the flags are known to be valid
    from cape_ray.lease import EXIT_LEASE_LOST, LeaseError, LeaseLost
    from cape_ray.ray_address import RayAddressError

    try:
        job.run(config)
    except ConfigError as exc:  # found before Ray starts (preflight.py): one line, exit 2
        parser.error(str(exc))
    except RayAddressError as exc:  # the cluster to join does not answer: found before Ray starts
        print(f"cape-ray train: error: {exc}", file=sys.stderr)
        return 2
    except LeaseLost as exc:  # lost while training: another driver may own the run now
        print(f"cape-ray train: error: {exc}", file=sys.stderr)
        return EXIT_LEASE_LOST
    except LeaseError as exc:  # another driver trains this run: one line, no traceback
        print(f"cape-ray train: error: {exc}", file=sys.stderr)
        return 3
    except job.RunStopped as exc:  # e.g. storage full: restarting would fail the same way
        print(f"cape-ray train: error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_inspect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cape_ray import checkpoint as ckpt, storage
    from cape_ray.original_format import describe, original_checkpoint

    fs, path = storage.resolve(args.checkpoint)
    if not storage.exists(fs, path):
        parser.error(f"no checkpoint at {args.checkpoint}")
    with storage.local_copy(fs, path) as local:
        problems = ckpt.verify_checkpoint(local)
        try:
            state = ckpt.read_state(local)
        except (OSError, ValueError) as exc:
            state, problems = {}, problems + [f"state.json unreadable: {exc}"]
        fields = describe(original_checkpoint(ckpt.load_checkpoint(local, verified=True))) if not problems else []
    position = state.get("position", {})
    report = {
        "checkpoint": args.checkpoint,
        "manifest": "verifies" if not problems else "DOES NOT VERIFY",
        "problems": problems,
        "fields": fields,  # the original pipeline's 14, under its names
        "schema_version": state.get("schema_version"),
        "position": {k: position.get(k) for k in ("epoch", "step", "episode", "global_step", "episodes_per_step")},
        "epochs_in_history": len(state.get("history", [])),
        "world_size": state.get("world_size"),
        "device": state.get("device"),
        "precision": state.get("precision"),
        "grad_scaler": state.get("grad_scaler"),
        "model": state.get("model"),
        "config_changes": state.get("config_changes"),
        "bests": {metric: {k: t.get(k) for k in ("best", "best_epoch", "export")}
                  for metric, t in state.get("tracking", {}).get("best", {}).items()},
        "metrics": state.get("metrics"),
        "versions": state.get("versions"),
        "config": state.get("config"),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return 0 if not problems else 1
    for key, value in report.items():
        if key == "fields":
            print("fields (the original pipeline's names):")
            for line in value:
                print(f"  {line}")
        elif isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {v}")
        else:
            print(f"{key}: {value}")
    return 0 if not problems else 1


def cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cape_ray import checkpoint as ckpt, storage
    from cape_ray.original_format import ORIGINAL_KEYS, save_pth

    fs, path = storage.resolve(args.checkpoint)
    if not storage.exists(fs, path):
        parser.error(f"no checkpoint at {args.checkpoint}")
    with storage.local_copy(fs, path) as local:
        try:
            loaded = ckpt.load_checkpoint(local)  # verifies the manifest first
        except ckpt.CheckpointError as exc:
            parser.error(str(exc))
        save_pth(loaded, args.pth)
    print(f"wrote {args.pth}: {', '.join(ORIGINAL_KEYS)} (loads with torch.load(..., weights_only=True))")
    return 0


def cmd_make_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.mp100_sizes:
        import os

        if args.preset != "default":
            parser.error("--mp100_sizes writes the default categories; it does not apply to --preset hard")

        from cape_ray.data.synthetic_large import export_mp100_sized

        if not args.scale > 0:
            parser.error(f"--scale must be > 0, got {args.scale}")
        export_mp100_sized(args.out, seed=args.seed, scale=args.scale, split=args.split,
                           image_format=args.image_format or "jpg", threads=args.threads or os.cpu_count() or 1)
    else:
        if args.scale != 1.0 or args.image_format or args.threads:
            parser.error("--scale, --image_format and --threads apply to --mp100_sizes only")
        from cape_ray.data.mp100 import export_synthetic

        export_synthetic(args.out, seed=args.seed, instances_per_category=args.instances_per_category,
                         canvas=args.canvas, split=args.split, preset=args.preset)
    print(f"wrote MP-100-format data to {args.out} (annotations/mp100_split{args.split}_*.json, images/)")
    return 0


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, choices=["builtin", "builtin-hard", "mp100"],
                        help="data source (default: the checkpoint's; mp100 with --data_root)")
    parser.add_argument(*_both("data_root"), dest="data_root", default=None,
                        help="MP-100-format files (default: the checkpoint's data, built-in if it had none)")
    parser.add_argument(*_both("mp100_split"), dest="mp100_split", type=int, default=None, choices=[1, 2, 3, 4, 5],
                        help="MP-100 split 1..5 (default: the checkpoint's)")
    parser.add_argument(*_both("num_shots"), dest="num_shots", type=int, default=None, choices=[1, 5],
                        help="support images per episode (default: the checkpoint's)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the fixed episodes (default: the checkpoint's data_seed)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")


def cmd_evaluate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from cape_ray import evaluate

    if args.protocol:
        return cmd_evaluate_protocol(args, parser)
    if args.checkpoint is None:
        parser.error("give --checkpoint PATH (or --protocol mp100 --checkpoints S1=PATH ... for the MP-100 table)")
    if args.checkpoints:
        parser.error("--checkpoints (one per split) goes with --protocol mp100; for one checkpoint use --checkpoint")
    args.split = args.split or "test"
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = evaluate.run(args.checkpoint, args.split, data_root=args.data_root, mp100_split=args.mp100_split,
                              num_shots=args.num_shots, episodes=args.episodes, queries=args.queries, seed=args.seed,
                              batch_size=args.batch_size, device=args.device,
                              feature_cache=not args.no_feature_cache, with_loss=args.with_loss, verbose=True,
                              data=args.data)
    except evaluate.EvaluationError as exc:
        print(f"cape-ray evaluate: error: {exc}", file=sys.stderr)
        return 1
    print(evaluate.format_report(report))
    out = evaluate.write_report(report, args.out or evaluate.default_output(args.split))
    print(f"wrote {out}")
    return 0


def cmd_evaluate_protocol(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """`evaluate --protocol mp100`: every given split's checkpoint on its test split, 1- and 5-shot."""
    import torch

    from cape_ray import evaluate, protocol

    for flag, value, why in (("--checkpoint", args.checkpoint, "give one checkpoint per split with --checkpoints"),
                             ("--mp100_split", args.mp100_split, "the split comes from each SPLIT=CHECKPOINT"),
                             ("--split", args.split not in (None, "test"), "the papers' table is on the test split")):
        if value:
            parser.error(f"{flag} does not go with --protocol mp100: {why}")
    if not args.checkpoints:
        parser.error("--protocol mp100 needs --checkpoints S1=PATH S2=PATH ... (one checkpoint per split)")
    try:
        checkpoints = protocol.parse_checkpoints(args.checkpoints)
    except evaluate.EvaluationError as exc:
        parser.error(str(exc))
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = protocol.run(
            checkpoints, args.data_root, shots=(args.num_shots,) if args.num_shots else protocol.SHOTS,
            episodes=protocol.EPISODES if args.episodes is None else args.episodes, queries=args.queries,
            seed=protocol.SEED if args.seed is None else args.seed, batch_size=args.batch_size, device=args.device,
            feature_cache=not args.no_feature_cache, verbose=True)
    except evaluate.EvaluationError as exc:
        print(f"cape-ray evaluate: error: {exc}", file=sys.stderr)
        return 1
    print(protocol.format_text(report))
    json_path, md_path = protocol.write(report, args.out or protocol.default_prefix())
    print(f"wrote {json_path} and {md_path}")
    return 0


def cmd_plot(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cape_ray import plots

    try:
        out = plots.plot_curves(args.run_dir, args.out, dpi=args.dpi)
    except (FileNotFoundError, ValueError) as exc:
        print(f"cape-ray plot: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def cmd_runs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from cape_ray import runs

    try:
        found = runs.list_runs(args.storage_path)
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"cape-ray runs: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(found, indent=1) if args.json else runs.format_table(found))
    return 0


def cmd_show(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from cape_ray import evaluate, plots

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        out = plots.show_predictions(args.checkpoint, args.out, args.split, episodes=args.episodes,
                                     queries=args.queries, num_shots=args.num_shots, data_root=args.data_root,
                                     mp100_split=args.mp100_split, seed=args.seed, device=args.device, dpi=args.dpi,
                                     data=args.data)
    except evaluate.EvaluationError as exc:
        print(f"cape-ray show: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def flag_reference(parser: argparse.ArgumentParser) -> str:
    """Every command's flags as Markdown tables, from the parser itself (docs/flags.md is this)."""
    lines = ["# Flag reference", "",
             "Generated from the parser: `cape-ray flags > docs/flags.md` (a test keeps the file equal to it). Every",
             "`train` flag can also come from a `--config` YAML file, under the same name.", ""]
    commands = parser._subparsers._group_actions[0]
    summaries = {action.dest: action.help for action in commands._choices_actions}
    for name, sub in commands.choices.items():
        lines += [f"## `cape-ray {name}`", "", (sub.description or summaries.get(name) or "").rstrip(".") + ".", ""]
        rows = []
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flags = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest.upper()}`"
            help_text = (action.help or "").replace("|", "\\|").replace("\n", " ")
            rows.append(f"| {flags} | {help_text} |")
        lines += ["| flag | meaning |", "|---|---|", *rows, ""]
    return "\n".join(line for line in lines) + "\n"


def cmd_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    print(flag_reference(build_parser()), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="cape-ray", description="Category-agnostic pose estimation on Ray Train")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineErrors)

    train = commands.add_parser("train", help="train (a Ray Train job; a private Ray instance unless RAY_ADDRESS, "
                                              "--address or a `ray start` on this machine says otherwise)")
    add_config_flags(train)
    train.set_defaults(handler=cmd_train)

    runs = commands.add_parser("runs", help="list the runs under a storage path: status, epochs, best PCK and loss")
    runs.add_argument("storage_path", nargs="?", default="runs",
                      help="the --storage_path of the runs: a local/NFS directory or s3://bucket/prefix (default: runs)")
    runs.add_argument("--json", action="store_true", help="print JSON (one object per run) for scripts")
    runs.set_defaults(handler=cmd_runs)

    inspect = commands.add_parser("inspect", help="print a checkpoint's fields and verify its manifest")
    inspect.add_argument("checkpoint", help="checkpoint directory (local path or URI)")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(handler=cmd_inspect)

    export = commands.add_parser("export", help="write a checkpoint as one .pth file with the original pipeline's 14 keys")
    export.add_argument("checkpoint", help="checkpoint directory (local path or URI)")
    export.add_argument("--pth", required=True, help="output file, e.g. checkpoint_e150.pth")
    export.set_defaults(handler=cmd_export)

    make_data = commands.add_parser("make-data", help="export the built-in categories as MP-100-format files")
    make_data.add_argument("--out", required=True, help="output directory")
    make_data.add_argument("--preset", choices=["default", "hard"], default="default",
                           help="which built-in categories: default (as --data builtin) or hard (as --data "
                                "builtin-hard: families, K 5-40, occlusion, truncation, symmetry, clutter)")
    make_data.add_argument(*_both("data_seed"), "--seed", dest="seed", type=int, default=0,
                           help="the built-in categories' seed: train with the same --data_seed to train on this data")
    make_data.add_argument("--instances_per_category", "--instances-per-category", type=int, default=60)
    make_data.add_argument("--canvas", type=int, default=96)
    make_data.add_argument("--split", type=int, default=1, choices=[1, 2, 3, 4, 5])
    make_data.add_argument(*_both("mp100_sizes"), dest="mp100_sizes", action="store_true",
                           help="MP-100's sizes instead: ~18k instances, K 5..35, images of 500-2,000 px "
                                "(--instances_per_category and --canvas do not apply)")
    make_data.add_argument("--scale", type=float, default=1.0,
                           help="with --mp100_sizes: multiply the instances per category (e.g. 0.05 on a small "
                                "machine); image sizes stay MP-100's")
    make_data.add_argument(*_both("image_format"), dest="image_format", choices=["jpg", "png"], default=None,
                           help="with --mp100_sizes: image files (default jpg, as MP-100's sources)")
    make_data.add_argument("--threads", type=int, default=None,
                           help="with --mp100_sizes: images encoded at once (default: every core)")
    make_data.set_defaults(handler=cmd_make_data)

    evaluate = commands.add_parser(
        "evaluate", help="PCK of a checkpoint on a split's unseen categories (MP-100 protocol); table + JSON; "
                         "--protocol mp100: the papers' table over the five splits")
    evaluate.add_argument("--checkpoint", default=None, help="checkpoint directory (local path or URI)")
    evaluate.add_argument("--split", default=None, choices=["test", "val", "train"], help="(default: test)")
    evaluate.add_argument("--protocol", default=None, choices=["mp100"],
                          help="mp100: the MP-100 papers' table: PCK@0.2 per split, 1-shot and 5-shot, and their "
                               "mean, beside the published numbers (with --checkpoints; --num_shots picks one setting; "
                               "--episodes 200, --queries 15 and --seed 1 by default, as the papers' test code)")
    evaluate.add_argument("--checkpoints", nargs="+", default=None, metavar="SPLIT=CHECKPOINT",
                          help="with --protocol mp100: one checkpoint per MP-100 split, e.g. S1=runs/s1/checkpoint_... "
                               "S2=...; each is evaluated on its own split's test categories")
    _add_data_flags(evaluate)
    evaluate.add_argument("--episodes", type=int, default=None,
                          help="fixed episodes per category (default: 200 for test, 100 for val, as MP-100)")
    evaluate.add_argument("--queries", type=int, default=15, help="queries per episode (MP-100: 15)")
    evaluate.add_argument(*_both("batch_size"), dest="batch_size", type=int, default=None,
                          help="episodes per forward (default: 4 on a CPU, 64 on a GPU); results do not depend on it")
    evaluate.add_argument("--out", default=None,
                          help="JSON report (default: ./evaluation_<split>.json, which the next evaluation of that "
                               "split overwrites); with --protocol mp100 a prefix: PREFIX.json and PREFIX.md "
                               "(default: ./mp100_protocol)")
    evaluate.add_argument(*_both("with_loss"), dest="with_loss", action="store_true",
                          help="also report the validation loss")
    evaluate.add_argument(*_both("no_feature_cache"), dest="no_feature_cache", action="store_true",
                          help="run the backbone on every image of every episode instead of once per instance")
    evaluate.set_defaults(handler=cmd_evaluate)

    plot = commands.add_parser("plot", help="PNG of train/val loss and val PCK per epoch from a run's metrics.jsonl")
    plot.add_argument("run_dir", help="run directory {storage_path}/{name} (local path or URI)")
    plot.add_argument("--out", default=None, help="PNG path (default: ./curves_<run name>.png)")
    plot.add_argument("--dpi", type=int, default=100)
    plot.set_defaults(handler=cmd_plot)

    show = commands.add_parser("show", help="PNG grid of supports and queries with ground truth and predictions")
    show.add_argument("checkpoint", help="checkpoint directory (local path or URI)")
    show.add_argument("--split", default="val", choices=["val", "test", "train"])
    _add_data_flags(show)
    show.add_argument("--episodes", type=int, default=4, help="rows: one episode of each of the first categories")
    show.add_argument("--queries", type=int, default=4, help="query images per row")
    show.add_argument("--out", default=None, help="PNG path (default: ./predictions_<checkpoint>_<split>.png)")
    show.add_argument("--dpi", type=int, default=100)
    show.set_defaults(handler=cmd_show)
    flags = commands.add_parser("flags", help="print every command's flags as Markdown (docs/flags.md)",
                                description="Print every command's flags as Markdown.")
    flags.set_defaults(handler=cmd_flags)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # the subcommand's parser
    return args.handler(args, sub)


if __name__ == "__main__":
    sys.exit(main())
