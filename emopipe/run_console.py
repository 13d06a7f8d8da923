"""What `emopipe run` prints while a run executes: a line when each step starts and one when it ends with
its result in words (the `summary` its materialization records) and its duration, each check's verdict,
and the lines the steps log themselves, indented under their step. Dagster's engine events, run ids and
tracebacks are left out (`-v` shows them through Dagster's own console logger); steps the experiment
does not use are not listed. Step failures are summarized by the CLI when the run ends."""

import logging
import sys

import dagster as dg
from dagster._core.log_manager import get_log_record_metadata  # noqa: the record's step and event, as Dagster attaches them

from emopipe.progress import bars_shown, format_duration

SKIPPED = "Dependencies for step "


class StepLines(logging.Handler):
    def __init__(self, hidden_steps: set[str], check_steps: set[str]):
        super().__init__()
        self.hidden_steps = hidden_steps
        self.check_steps = check_steps  # their verdict line is their result: no start and end lines
        self.summaries: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        meta = get_log_record_metadata(record)
        step = meta.get("step_key") or "run"
        if step in self.hidden_steps:
            return
        event = meta.get("dagster_event")
        if event is None:
            if record.levelno < logging.INFO:
                return
            message = meta.get("orig_message", record.getMessage())
            if not message.startswith(SKIPPED):  # the engine's note for each step after a failure: the summary names it
                self.write(f"    {message}", error=record.levelno >= logging.WARNING)
            return
        line = self.event_line(step, event)
        if line:
            self.write(line)

    def event_line(self, step: str, event) -> str | None:
        kind = event.event_type_value
        data = event.event_specific_data
        if step in self.check_steps and kind in ("STEP_START", "STEP_SUCCESS"):
            return None
        if kind == "STEP_START":
            return f"▸ {step}"
        if kind == "ASSET_MATERIALIZATION":
            summary = data.materialization.metadata.get("summary")
            if summary is not None:
                self.summaries[step] = summary.value
            return None
        if kind == "STEP_SUCCESS":
            return f"✓ {step}: {self.summaries.get(step, 'done')} ({format_duration(data.duration_ms / 1000)})"
        if kind == "STEP_FAILURE":
            return f"✗ {step}: failed (the reason follows when the run ends)"
        if kind == "ASSET_CHECK_EVALUATION":
            verdict = "passed" if data.passed else "FAILED"
            return f"  check {data.check_name}: {verdict}" + (f", {data.description}" if data.description else "")
        return None

    @staticmethod
    def write(line: str, error: bool = False) -> None:
        stream = sys.stderr if error else sys.stdout
        if bars_shown():  # above the bars, which tqdm redraws below
            from tqdm import tqdm

            tqdm.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)


@dg.logger(config_schema={"hidden_steps": dg.Field([str], default_value=[]), "check_steps": dg.Field([str], default_value=[])},
           description="emopipe run: a line per step start and end, check verdicts and the steps' own messages")
def step_lines(init_context) -> logging.Logger:
    logger = logging.Logger("emopipe.run", level=logging.DEBUG)  # the engine's events come at DEBUG
    config = init_context.logger_config
    logger.addHandler(StepLines(set(config["hidden_steps"]), set(config["check_steps"])))
    return logger
