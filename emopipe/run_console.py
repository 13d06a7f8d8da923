"""What `emopipe run` prints while a run executes: the lines the steps log themselves, one per
message and named by step, without Dagster's engine events, run ids or tracebacks (`-v` shows those
through Dagster's own console logger). Step failures are summarized by the CLI when the run ends."""

import logging
import sys

import dagster as dg
from dagster._core.log_manager import get_log_record_metadata  # noqa: the record's step and event, as Dagster attaches them


SKIPPED = "Dependencies for step "


class _StepLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        meta = get_log_record_metadata(record)
        if meta.get("dagster_event") is not None:  # an engine event: STEP_START, LOADED_INPUT, STEP_FAILURE ...
            return
        message = meta.get("orig_message", record.getMessage())
        if message.startswith(SKIPPED):  # the engine's note for each step after a failure: the summary names the failure
            return
        step = meta.get("step_key") or "run"
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        print(f"{step}: {message}", file=stream, flush=True)


@dg.logger(description="emopipe run: the steps' own messages, one line each")
def step_lines(_init_context) -> logging.Logger:
    logger = logging.Logger("emopipe.run", level=logging.INFO)
    logger.addHandler(_StepLines())
    return logger
