"""``e3rl eval``: run a model on verifiable problems, in-process or through a live server.

Reports pass@1 averaged over ``n`` samples, majority@n, tokens returned and computed,
erasures per sample and wall time; for arith-chain run in-process, also the step-level
uncertainty analysis (AUROC of each segment score for "this step is wrong").
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from .datasets import Problem
from .grading import extract_arith_answer, grade_arith
from .math_grading import grade_math
from .step_analysis import step_records, summarize


@dataclass(slots=True)
class EvalSettings:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    max_tokens: int = 256
    healing: dict | None = None  # healing options, None = off


@dataclass(slots=True)
class Sample:
    text: str
    correct: bool
    answer: str | None
    num_returned: int
    num_computed: int
    num_erasures: int


@dataclass
class EvalResult:
    settings: EvalSettings
    samples: list[list[Sample]]  # per problem, n samples
    wall_time_s: float
    step_analysis: dict | None = None
    extra: dict = field(default_factory=dict)

    def report(self) -> dict:
        flat = [s for per in self.samples for s in per]
        num = len(self.samples)
        pass1 = sum(sum(s.correct for s in per) / len(per) for per in self.samples) / max(num, 1)
        maj = sum(_majority_correct(per) for per in self.samples) / max(num, 1)
        out = {
            "pass@1": pass1, "maj@n": maj, "num_problems": num,
            "tokens_returned": sum(s.num_returned for s in flat),
            "tokens_computed": sum(s.num_computed for s in flat),
            "erasures_per_sample": sum(s.num_erasures for s in flat) / max(len(flat), 1),
            "wall_time_s": self.wall_time_s, **asdict(self.settings), **self.extra,
        }
        if self.step_analysis is not None:
            out["step_analysis"] = self.step_analysis
        return out


def _majority_correct(samples: list[Sample]) -> bool:
    votes = collections.Counter(s.answer for s in samples if s.answer is not None)
    if not votes:
        return False
    top = votes.most_common(1)[0][0]
    return next(s.correct for s in samples if s.answer == top)


def grade(problem: Problem, text: str) -> tuple[bool, str | None]:
    if problem.task == "arith":
        return grade_arith(text, problem.answer), extract_arith_answer(text)
    return grade_math(text, problem.answer), text.strip()[-64:] or None


def sampling_options(settings: EvalSettings, index: int) -> dict:
    options = dict(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                   seed=settings.seed * 1_000_003 + index, max_tokens=settings.max_tokens)
    if settings.healing is not None:
        options["healing"] = settings.healing
    return options


def evaluate_in_process(llm, problems: list[Problem], settings: EvalSettings,
                        analyze_steps: bool = True, progress: bool = True) -> EvalResult:
    """Run through the engine (``e3rl.engine.LLM``)."""
    from e3rl.engine import SamplingParams

    params = [SamplingParams(**sampling_options(settings, i)) for i in range(len(problems))]
    start = time.perf_counter()
    outputs = llm.generate([p.prompt for p in problems], params, use_tqdm=progress)
    wall = time.perf_counter() - start
    samples, records = [], []
    for problem, out in zip(problems, outputs):
        per = []
        for o in out.outputs:
            ok, answer = grade(problem, o.text)
            per.append(Sample(o.text, ok, answer, len(o.token_ids), o.num_computed_tokens,
                              len(o.erasures)))
            if analyze_steps and problem.task == "arith":
                records += step_records(problem.question, o.text, o.token_ids, o.nll, o.entropy,
                                        llm.tokenizer)
        samples.append(per)
    analysis = summarize(records) if records else None
    return EvalResult(settings, samples, wall, analysis)


def evaluate_over_http(url: str, model: str | None, problems: list[Problem],
                       settings: EvalSettings, *, api_key: str | None = None,
                       concurrency: int = 16, retries: int = 3,
                       timeout_s: float = 600.0) -> EvalResult:
    """Run through a server's ``/v1/completions`` (with concurrency and retries)."""
    import httpx

    async def run() -> list[list[Sample]]:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limit = asyncio.Semaphore(concurrency)
        results: list[list[Sample] | None] = [None] * len(problems)
        async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers,
                                     timeout=timeout_s) as client:
            cards = (await client.get("/v1/models")).json()["data"]
            name = model or cards[0]["id"]
            # Healing off means off: an e3rl server heals sampled requests by default when its
            # model is calibrated (its card says so), which would blur a plain measurement.
            heals_by_default = any(card.get("healing", {}).get("default") == "on"
                                   for card in cards if card.get("id") == name)
            bar = tqdm(total=len(problems), desc="eval")

            async def one(i: int, problem: Problem) -> None:
                body = {"model": name, "prompt": problem.prompt, **sampling_options(settings, i)}
                if heals_by_default:
                    body.setdefault("healing", {"enabled": False})
                async with limit:
                    data = await _post_with_retries(client, body, retries)
                per = []
                for choice in sorted(data["choices"], key=lambda c: c["index"]):
                    ok, answer = grade(problem, choice["text"])
                    ext = choice.get("e3rl") or {}
                    returned = ext.get("num_output_tokens", len(choice["text"]))
                    per.append(Sample(choice["text"], ok, answer, returned,
                                      ext.get("num_computed_tokens", returned),
                                      ext.get("num_erasures", 0)))
                results[i] = per
                bar.update(1)

            await asyncio.gather(*(one(i, p) for i, p in enumerate(problems)))
            bar.close()
        return results

    start = time.perf_counter()
    samples = asyncio.run(run())
    return EvalResult(settings, samples, time.perf_counter() - start)


async def _post_with_retries(client, body: dict, retries: int) -> dict:
    import httpx

    for attempt in range(retries + 1):
        try:
            response = await client.post("/v1/completions", json=body)
            if response.status_code in (429, 500, 502, 503, 504) and attempt < retries:
                await asyncio.sleep(0.5 * 2**attempt)
                continue
            if response.status_code != 200:
                raise RuntimeError(f"server answered {response.status_code}: {response.text[:300]}")
            return response.json()
        except httpx.TransportError:
            if attempt == retries:
                raise
            await asyncio.sleep(0.5 * 2**attempt)
    raise RuntimeError("unreachable")
