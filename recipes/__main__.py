"""``python -m recipes``: launch a recipe on an executor, or print what would be submitted."""

from __future__ import annotations

import argparse
import inspect
import sys

import yaml

from salm_megatron.config import apply_overrides

from . import configs

PROG = "python -m recipes"
EXAMPLE = """examples:
  python -m recipes --list
  python -m recipes --factory salm_tiny --executor local \\
      data.train_shards='data/shard-{0..3}.tar' data.tokenizer=data/tokenizer.json \\
      llm.vocab_size=302 train.steps=50
  python -m recipes --factory salm_llama3_8b --executor slurm executor.account=speech \\
      executor.partition=batch executor.container_image=nvcr.io/you/salm:0.1 \\
      'executor.container_mounts=[/lustre:/lustre]' data.train_shards=... data.tokenizer=... \\
      --dryrun
  python -m recipes --factory salm_eval --executor local checkpoint=runs/salm-tiny \\
      data=data/valid/shard-000000.tar out=eval/salm-tiny

key=value: executor.NAME=VALUE sets an executor argument; for training recipes any other key is
a config override (salm config's syntax); for salm_eval they are its arguments (checkpoint, data,
out, tensor_parallel, limit, args). Values are YAML scalars or lists.
"""


class UsageError(ValueError):
    pass


INSTALL_LAUNCH = "pip install -e '.[launch]' in this repository (or `make test`, which does)"


def _nemo_run():
    """The modules that need NeMo-Run (``--list`` and ``--help`` need neither)."""
    try:
        from . import executors, factories
    except ModuleNotFoundError as err:
        if err.name != "nemo_run":
            raise
        raise UsageError(f"launching a recipe needs NeMo-Run, which is not installed: "
                         f"{INSTALL_LAUNCH}") from None  # fmt: skip
    return executors, factories


def _parse(items: list[str]) -> tuple[dict, list[str]]:
    """``executor.*`` pairs as a dict of YAML values; the other items untouched."""
    executor, rest = {}, []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{item!r} is not of the form key=value")
        if key.startswith("executor."):
            executor[key.removeprefix("executor.")] = yaml.safe_load(text) if text else None
        else:
            rest.append(item)
    return executor, rest


def _check_arguments(what: str, function, arguments: dict) -> None:
    known = list(inspect.signature(function).parameters)
    for name in arguments:
        if name not in known:
            raise UsageError(f"{what} has no argument {name!r}; it has: {', '.join(known)}")


def build(factory: str, executor_name: str, items: list[str]):
    """The task (``run.Partial`` or ``run.Script``) and executor the command line describes."""
    executors, factories = _nemo_run()
    if executor_name not in executors.EXECUTORS:
        raise UsageError(f"--executor {executor_name!r} is not one of local, slurm")
    make_executor = executors.EXECUTORS[executor_name]
    executor_args, rest = _parse(items)
    if factory == "salm_eval":
        tasks, nodes = 8, 1
        arguments = {k: yaml.safe_load(v) for k, _, v in (i.partition("=") for i in rest)}
        _check_arguments("salm_eval", factories.salm_eval, arguments)
        missing = {"checkpoint", "data", "out"} - set(arguments)
        if missing:
            raise UsageError(f"salm_eval needs {', '.join(sorted(missing))}=...")
        task = factories.salm_eval(**arguments)
        if executor_name == "slurm":
            executor_args.setdefault("torchrun", True)  # salm eval reads torchrun's variables
    elif factory in configs.TRAINING:
        recipe = configs.TRAINING[factory]
        tasks, nodes = recipe.tasks_per_node, recipe.nodes
        config = apply_overrides(recipe.config(), rest)
    else:
        names = ", ".join([*configs.TRAINING, "salm_eval"])
        raise UsageError(f"--factory {factory!r} is not one of {names}")
    if executor_name == "local":
        executor_args.setdefault("ntasks_per_node", tasks)
        world = executor_args["ntasks_per_node"]
    else:
        executor_args.setdefault("nodes", nodes)
        executor_args.setdefault("gpus_per_node", tasks)
        per_node = executor_args.get("ntasks_per_node") or max(executor_args["gpus_per_node"], 1)
        world = executor_args["nodes"] * per_node
    _check_arguments(f"the {executor_name} executor", make_executor, executor_args)
    if factory != "salm_eval":
        config.parallel.validate_world(world)
        config.train.microbatches(config.data, config.parallel.data_parallel_size(world))
        task = factories.training(config)
    return task, make_executor(**executor_args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--factory", help="recipe name (see --list)")
    parser.add_argument("--executor", default="local", help="local | slurm (default: local)")
    parser.add_argument("--name", help="experiment name (default: the factory's)")
    parser.add_argument("--dryrun", action="store_true", help="print what would run, run nothing")
    parser.add_argument("--detach", action="store_true", help="submit and return (SLURM)")
    parser.add_argument("--list", action="store_true", help="list the recipes")
    parser.add_argument("overrides", nargs="*", help="key=value (see below)")
    args = parser.parse_args(argv)
    if args.list:
        width = max(map(len, configs.TRAINING))
        for name, recipe in configs.TRAINING.items():
            print(f"{name:<{width}}  {recipe.help}")
        print(f"{'salm_eval':<{width}}  salm eval of a checkpoint (checkpoint=, data=, out=)")
        return 0
    if not args.factory:
        parser.error("--factory is required (see --list)")
    try:
        task, executor = build(args.factory, args.executor, args.overrides)
    except (UsageError, ValueError) as err:  # ConfigError is a ValueError
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return launch(task, executor, args.name or args.factory, args.dryrun, args.detach)


def launch(task, executor, name: str, dryrun: bool = False, detach: bool = False) -> int:
    """Run ``task`` as a NeMo-Run experiment; 0 when it succeeded (or was only submitted)."""
    import nemo_run as run

    with run.Experiment(name, executor=executor) as experiment:
        experiment.add(task, name=name, tail_logs=not detach)
        if dryrun:
            experiment.dryrun()
            return 0
        experiment.run(detach=detach)
    if detach:
        return 0
    state = experiment.jobs[0].state  # the experiment waits for its job on leaving the block
    if state.name != "SUCCEEDED":
        print(f"{PROG}: {name} ended {state.name} (its log is above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
