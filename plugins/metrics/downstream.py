"""Downstream task accuracy through lm-evaluation-harness, on the model as it is in the run.

The optional extra ``sparsify[eval]`` installs ``lm-eval``; without it the
``lm_eval`` metric is still listed, and a recipe that asks for it is refused
with a one-line error before anything loads. ``make_lm`` builds lm-eval's
model API (``loglikelihood``, ``loglikelihood_rolling``,
``generate_until``) over the in-process model and tokenizer, so converted and
sparse modules are evaluated exactly as they compute (no save and reload).

Tasks come from lm-eval's registry or from folders of task YAML files
(``include_path``); the shipped offline task ``sparsify_pydoc_next`` (see
``lm_eval_tasks/``) is always on the path. Datasets are never downloaded:
lm-eval runs with ``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` set, and a task
whose dataset is not cached is refused when the recipe is validated.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from sparsify_core import Metric, MetricValue
from sparsify_core.errors import one_line
from sparsify_core.method import Params as BaseParams
from sparsify_core.metric import MetricInfo

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
SHIPPED_TASK = "sparsify_pydoc_next"
#: lm-eval metrics whose values lie in [0, 1] (shown as percents).
FRACTION_METRICS = frozenset({"acc", "acc_norm", "exact_match", "f1", "acc_mutual_info"})
_INSTALL = "the lm_eval metric needs the lm-eval package: pip install 'sparsify[eval]'"


def lm_eval_available() -> bool:
    """True when the ``lm-eval`` package imports."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def offline():
    """No download while inside: the HF offline switches, in the environment and in the loaded modules.

    ``datasets`` and ``huggingface_hub`` read the environment once, at import,
    so their module constants are switched too; all are restored on exit.
    """
    env = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    os.environ.update({k: "1" for k in env})
    patched = []
    for module, attr in (("datasets.config", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE"),
                         ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        try:
            mod = __import__(module, fromlist=[attr])
        except ImportError:
            continue
        if hasattr(mod, attr):
            patched.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def task_manager(tasks: list[str], include_path: list[str]):
    """An lm-eval ``TaskManager`` that knows ``tasks``: the shipped and ``include_path`` folders first.

    lm-eval's own registry (thousands of YAML files, seconds to index) is
    scanned only when a task is not found in those folders. Raises
    ``ValueError`` naming the tasks found nowhere.
    """
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *include_path]
    manager = TaskManager(include_path=paths, include_defaults=False)
    if not set(tasks) <= set(manager.all_tasks):
        manager = TaskManager(include_path=paths)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise ValueError(f"unknown lm-eval task{'s' if len(missing) > 1 else ''} {', '.join(missing)} (not in "
                         f"lm-eval's registry nor in {', '.join(paths)})")
    return manager


def load_tasks(tasks: list[str], include_path: list[str]) -> dict:
    """lm-eval's task dict for ``tasks``, datasets loaded offline; ``ValueError`` naming a task whose data is missing."""
    from lm_eval.tasks import get_task_dict

    manager = task_manager(tasks, include_path)
    out = {}
    with offline():
        for t in tasks:  # one at a time, so the error names the task
            try:
                out.update(get_task_dict([t], manager))
            except Exception as exc:
                raise ValueError(f"task {t}: cannot load its dataset offline (sparsify never downloads during a "
                                 f"run; cache it first, e.g. run lm-eval once with network access): "
                                 f"{one_line(exc)}") from None
    return out


def make_lm(model: torch.nn.Module, tokenizer, device: torch.device, batch_size: int):
    """lm-eval's model API (a ``TemplateLM``) over the in-process causal LM ``model`` and its ``tokenizer``.

    ``loglikelihood`` scores ``(context, continuation)`` pairs, one forward
    pass per batch of ``batch_size`` sequences (right-padded: causal
    attention leaves the scored positions unaffected), each cut to the
    model's last ``max_length`` tokens (its position limit, else 2048);
    ``loglikelihood_rolling`` scores whole texts in disjoint windows as
    lm-eval's HF model does; ``generate_until`` decodes greedily until a stop
    string, EOS or ``max_gen_toks`` (default 256) new tokens.
    """
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM

    config = getattr(model, "config", None)
    max_length = next((int(getattr(config, k)) for k in ("max_position_embeddings", "n_positions", "max_length")
                       if getattr(config, k, None)), 2048)

    class _LM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.tokenizer = tokenizer
            self.max_length = max_length
            self.batch_size = batch_size
            self._device = device

        @property
        def eot_token_id(self) -> int:
            return tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

        def _logits(self, rows: list[list[int]]) -> torch.Tensor:
            width = max(len(r) for r in rows)
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eot_token_id
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=self._device)
            with torch.no_grad():
                out = model(input_ids=ids, use_cache=False)
            return (out.logits if hasattr(out, "logits") else out[0]).float()

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            results = [None] * len(requests)
            # longest first: batches of similar lengths pad little (the order does not change a result)
            order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                rows, conts = [], []
                for i in chunk:
                    _, ctx_enc, cont_enc = requests[i]
                    whole = (ctx_enc + cont_enc)[-(self.max_length + 1):]
                    rows.append(whole[:-1])
                    conts.append(cont_enc[-len(whole) + 1:] if len(cont_enc) >= len(whole) else cont_enc)
                logp = F.log_softmax(self._logits(rows), dim=-1)
                for j, i in enumerate(chunk):
                    n, cont = len(rows[j]), conts[j]
                    lp = logp[j, n - len(cont):n]
                    target = torch.tensor(cont, device=lp.device)
                    score = float(lp.gather(-1, target[:, None]).sum())
                    greedy = bool((lp.argmax(dim=-1) == target).all())
                    results[i] = (score, greedy)
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            out = []
            for (string,) in [req.args for req in requests]:
                windows = map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1))
                scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
                out.append(sum(s for s, _ in scores))
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            out = []
            for context, gen_kwargs in [req.args for req in requests]:
                kwargs = dict(gen_kwargs or {})
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", 256))
                ids = self.tok_encode(context)[-(self.max_length - max_new):]
                new: list[int] = []
                text = ""
                for _ in range(max_new):
                    nxt = int(self._logits([ids + new])[0, -1].argmax())
                    if nxt == self.eot_token_id:
                        break
                    new.append(nxt)
                    text = tokenizer.decode(new)
                    if any(s in text for s in until):
                        break
                for s in until:
                    text = text.split(s)[0]
                out.append(text)
            return out

    return _LM()


class LMEval(Metric):
    """Downstream task accuracy with lm-evaluation-harness (optional extra sparsify[eval]), per task.

    Records ``lm_eval/<task>/<metric>`` for every metric lm-eval reports
    (``acc``, ``acc_norm``...; a fraction, higher is better) and its
    ``lm_eval/<task>/<metric>_stderr``, for tasks and groups alike; values
    of a filter other than lm-eval's default are named ``<metric>@<filter>``.
    Runs its own passes over each task's documents (not the eval split),
    with the model in eval mode and the module train/eval flags and the
    global RNG states restored afterwards. Not part of ``metrics: all``:
    ask for it, e.g. ``{lm_eval: {tasks: [sparsify_pydoc_next]}}``.
    """

    name = "lm_eval"
    higher_is_better = True
    unit = ""
    fraction = True
    tasks = frozenset({"causal_lm"})
    in_all = False

    class Params(BaseParams):
        tasks: list[str] = Field(default_factory=lambda: [SHIPPED_TASK], min_length=1,
                                 description="lm-eval task or group names (the shipped offline task: "
                                             f"{SHIPPED_TASK}, chance 25%)")
        num_fewshot: int | None = Field(0, ge=0, description="examples in each prompt; null: each task's default")
        limit: float | None = Field(None, gt=0, description="documents per task: a count, or a fraction if < 1")
        batch_size: int = Field(8, gt=0, description="sequences per forward pass")
        include_path: list[str] = Field(default_factory=list, description=(
            "folders of lm-eval task YAML files (relative to the working directory)"))

    @classmethod
    def check(cls, params: Params) -> None:
        """The package is installed, every task is known and its dataset loads offline (``ValueError`` if not)."""
        if not lm_eval_available():
            raise ValueError(_INSTALL)
        for p in params.include_path:
            if not Path(p).is_dir():
                raise ValueError(f"include_path {p!r} is not a folder")
        load_tasks(params.tasks, params.include_path)

    def applies_to(self, ctx) -> bool:
        return super().applies_to(ctx) and ctx.tokenizer is not None

    def info_of(self, value_name: str) -> MetricInfo:
        """``lm_eval/<task>/<metric>``: higher is better as lm-eval says; ``_stderr`` values have no direction."""
        metric = value_name.rsplit("/", 1)[-1].split("@")[0]
        if metric.endswith("_stderr"):
            return MetricInfo(higher_is_better=None, fraction=metric.removesuffix("_stderr") in FRACTION_METRICS)
        better = getattr(self, "_better", {}).get(value_name, True)
        return MetricInfo(higher_is_better=better, fraction=metric in FRACTION_METRICS)

    def finish(self, ctx) -> list[MetricValue]:
        if not lm_eval_available():
            raise RuntimeError(_INSTALL)
        from lm_eval.evaluator import evaluate as lm_evaluate

        p = self.params
        task_dict = load_tasks(p.tasks, p.include_path)
        if p.num_fewshot is not None:
            _set_fewshot(task_dict, p.num_fewshot)
        model = ctx.model
        modes = {m: m.training for m in model.modules()}
        model.eval()
        try:
            with offline(), torch.no_grad(), torch.random.fork_rng(devices=[]):
                results = lm_evaluate(make_lm(model, ctx.tokenizer, ctx.device, p.batch_size), task_dict,
                                      limit=p.limit, bootstrap_iters=1000, log_samples=False, verbosity="ERROR")
        finally:
            for module, mode in modes.items():
                module.training = mode
        return self._values(results)

    def _values(self, results: dict) -> list[MetricValue]:
        """``MetricValue`` s from lm-eval's results dict (``results[task]["acc,none"]`` ...)."""
        values, self._better = [], {}
        better = results.get("higher_is_better", {})
        for task, row in sorted(results.get("results", {}).items()):
            for key, value in row.items():
                metric, _, filt = key.partition(",")
                if not filt or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue  # alias, sample counts, "N/A" stderr
                name = f"{self.name}/{task}/{metric}" + ("" if filt == "none" else f"@{filt}")
                base = metric.removesuffix("_stderr")
                if base in better.get(task, {}):
                    self._better[name] = bool(better[task][base])
                values.append(MetricValue(name, float(value) if math.isfinite(value) else math.nan))
        if not values:
            raise RuntimeError(f"lm-eval returned no results for {', '.join(self.params.tasks)}")
        return values


def _set_fewshot(task_dict: dict, n: int) -> None:
    """Set ``num_fewshot`` on every task of lm-eval's (possibly nested) task dict, as lm-eval's CLI does."""
    for value in task_dict.values():
        if isinstance(value, dict):
            _set_fewshot(value, n)
        elif value is not None and hasattr(value, "set_config"):
            if n > 0 or value.get_config("num_fewshot") is not None:
                value.set_config(key="num_fewshot", value=n)
