"""``python -m trainer --stage sft|reward|ppo|grpo|dpo --config FILE``: run one stage.

Exit 0 on success, ``PERMANENT_FAILURE_EXIT_CODE`` (3) when retrying cannot help (an invalid
config, a bad dataset row, a missing model ...), 1 on any other failure.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.config import (
    PERMANENT_FAILURE_EXIT_CODE, PERMANENT_FAILURE_PREFIX, ConfigError, ReportingConfig, load_stage_job,
)
from trainer.reporting import write_termination_message

DEFAULT_TERMINATION_LOG = Path(ReportingConfig().termination_log_path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    parser.add_argument("--stage", required=True, choices=["sft", "reward", "ppo", "grpo", "dpo"],
                        help="stage to run; must equal the config file's stage (a guard against a wrong file)")
    parser.add_argument("--config", required=True, help="StageJob file (YAML or JSON)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = load_stage_job(args.config)
        if job.stage != args.stage:
            raise ConfigError(f"{args.config}: stage is {job.stage!r} but --stage {args.stage} was given; "
                              "pass the matching --stage or the right config file")
    except ConfigError as exc:
        print(f"[{args.stage}] failed: {exc}", file=sys.stderr, flush=True)
        # The job (and its terminationLogPath) could not be read: use the Kubernetes default,
        # which exists only inside a pod (the kubelet creates it); never create it elsewhere.
        if DEFAULT_TERMINATION_LOG.exists():
            write_termination_message(DEFAULT_TERMINATION_LOG, PERMANENT_FAILURE_PREFIX + str(exc))
        return PERMANENT_FAILURE_EXIT_CODE
    from trainer.runtime import run_stage  # torch and transformers load only for a valid job

    return run_stage(job)


if __name__ == "__main__":
    sys.exit(main())
