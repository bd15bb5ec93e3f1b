"""What a save learned and what it broke, measured with the base model the run already holds, and which save and
strength to use.

Every measure is deterministic (fixed pictures, timesteps and noise), so saves compare:
- *learned*: the share of the base model's denoising loss the LoRA removes on pictures it must reproduce (a held-out
  split when the dataset is large enough, else the training pictures, and the event says which), at each strength;
- *bleed*: how much the LoRA changes the denoiser's prediction for prompts without the trigger word (the captions
  with it taken out, and a few generic prompts), relative to how much it changes it for the captions with it;
- *overfit*: the held-out loss risen above its lowest while the training pictures' loss kept falling.
A strength changes the adapters in place (the run's own, or a file loaded into a pipeline); 0 is the base.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdlora import dataset as ds
from sdlora.batches import token_ids

STRENGTHS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
GENERIC_PROMPTS = ("a picture", "a photo of a cat", "a landscape painting")
EVAL_PICTURES = 4  # pictures whose loss is measured (held out, or from the training set)
TIMESTEP_FRACTIONS = (0.125, 0.375, 0.625, 0.875)  # the noise levels, as fractions of the training schedule
BLEED_FRACTIONS = (0.375, 0.625)
NEAR_BEST = 0.95  # a strength within this share of a save's best learned is as good, and a lower one is preferred
SHORTLIST = 0.9  # saves within this share of the best learned are candidates; the least bleed wins
OVERFIT_RISE = 0.02  # the held-out loss this far above its lowest, with the training loss lower: overfit


def split(records: list, holdout: int, seed: int) -> tuple[list, list]:
    """(training records, held-out records). `holdout` -1: a few pictures held out when there are 30 or more
    (5%, 2 to 8), else none; 0: none; N: N pictures (at least 4 left to train on)."""
    n = len(records)
    if holdout < 0:
        holdout = min(8, max(2, n // 20)) if n >= 30 else 0
    holdout = max(0, min(holdout, n - 4))
    if not holdout:
        return records, []
    picked = set(random.Random(seed).sample(range(n), holdout))
    return [r for i, r in enumerate(records) if i not in picked], [r for i, r in enumerate(records) if i in picked]


def without_trigger(caption: str, trigger: str) -> str:
    """`caption` with the trigger word and the comma after it taken out."""
    if not trigger:
        return caption
    out = re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)\s*,?\s*", "", caption).strip().strip(",").strip()
    return out or "a picture"


@dataclass
class Measure:
    """One save's measures: per strength, `learned` (share of the base loss removed) and `bleed` (change without the
    trigger / change with it); the held-out and training pictures' loss at strength 1."""

    step: int
    strengths: dict[float, dict] = field(default_factory=dict)
    heldout_loss: float | None = None
    train_loss: float | None = None
    overfit: bool | None = None

    def suggested(self) -> float:
        """The lowest strength whose learned is within NEAR_BEST of this save's best (1 when none is a number; the
        best itself when none lowered the loss, as early in a run: a share of a negative best means nothing)."""
        learned = {s: m["learned"] for s, m in self.strengths.items() if math.isfinite(m["learned"])}
        if not learned:
            return 1.0
        best = max(learned.values())
        if best <= 0:
            return max(learned, key=learned.get)
        return min(s for s, value in learned.items() if value >= NEAR_BEST * best)


class Evaluator:
    """The fixed inputs of a run's measures, and the base model's predictions on them (strength 0), computed once."""

    def __init__(self, *, denoiser, text_encoders, tokenizers, family, vae, objective, scaling: tuple[float, float],
                 set_strength, records, heldout, trigger: str, resolution: int, clip_skip: int, seed: int,
                 device, dtype=torch.float32, batch_size: int = 8, autocast=contextlib.nullcontext,
                 adapted_encoders: int | None = None):
        """`denoiser`: the family's (a UNet, or SD3's transformer); `scaling`: (scaling_factor, shift_factor) of the
        VAE's latents, as the step applies them; `adapted_encoders`: how many of `text_encoders` (the first ones) carry
        adapters (default: all). The others' outputs do not depend on the strength: each prompt goes through them
        once, here, so SD3's and FLUX.1's T5 is not needed on the device again."""
        adapted = len(text_encoders) if adapted_encoders is None else adapted_encoders
        text_encoders = [te if i < adapted else _Remembered(te) for i, te in enumerate(text_encoders)]
        self.denoiser, self.text_encoders, self.tokenizers, self.family = denoiser, text_encoders, tokenizers, family
        self.objective, self.set_strength, self.device, self.dtype = objective, set_strength, device, dtype
        # as many pictures a forward as training takes, more where they are small (64 px: 32)
        self.clip_skip, self.autocast = clip_skip, autocast
        self.batch_size = max(1, batch_size, 32 * 64 * 64 // resolution ** 2)
        self.on = "held-out pictures" if heldout else "training pictures"
        rng = random.Random(seed)
        learn = list(heldout)[:EVAL_PICTURES] or rng.sample(list(records), min(EVAL_PICTURES, len(records)))
        train = rng.sample(list(records), min(EVAL_PICTURES, len(records))) if heldout else []
        bucket = (resolution, resolution)  # every picture centre-cropped to the square: one shape, one batch
        self.time_ids = family.time_ids((resolution, resolution), (0, 0), bucket)
        gen = torch.Generator().manual_seed(seed)
        total = objective.num_train_timesteps
        # DDPM indexes its schedule by integer timesteps; flow matching takes sigma x 1000 as a float
        self.t_dtype = torch.float32 if family.objective == "flow" else torch.long

        def inputs(recs, fractions):
            latents = self._latents(vae, recs, bucket, scaling)
            rows = []
            for i, rec in enumerate(recs):
                for f in fractions:
                    noise = torch.randn(latents.shape[1:], generator=gen).to(device, dtype)
                    rows.append((latents[i], noise, int(f * total), rec.caption))
            return rows

        self.learn = inputs(learn, TIMESTEP_FRACTIONS)
        self.train = inputs(train, TIMESTEP_FRACTIONS)
        # bleed: the learn rows at BLEED_FRACTIONS (the captions), and the same noisy latents with prompts that lack
        # the trigger word
        self.with_rows = [i for i, (_, _, t, _) in enumerate(self.learn) if t in {int(f * total) for f in
                                                                                  BLEED_FRACTIONS}]
        bleed_with = [self.learn[i] for i in self.with_rows]
        without = [(lat, noise, t, without_trigger(caption, trigger)) for lat, noise, t, caption in bleed_with] \
            if trigger else []
        without += [(lat, noise, t, prompt) for lat, noise, t, _ in bleed_with[:len(BLEED_FRACTIONS)]
                    for prompt in GENERIC_PROMPTS]
        self.without = without
        self.models = [denoiser, *(te.model if isinstance(te, _Remembered) else te for te in text_encoders)]
        self.base = self._run(lambda: self._predict_sets(0.0))

    def _run(self, compute):
        """`compute()` with every model in eval mode (no adapter dropout), each put back as it was."""
        modes = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        try:
            with self.autocast():
                return compute()
        finally:
            for m, mode in zip(self.models, modes):
                m.train(mode)

    def _predict_sets(self, strength: float) -> dict[str, torch.Tensor]:
        """The predictions of every set at `strength`, in one pass (the prompts encoded once)."""
        sets = {"learn": self.learn, "train": self.train, "without": self.without}
        preds = self._predict([row for rows in sets.values() for row in rows], strength)
        out, at = {}, 0
        for name, rows in sets.items():
            out[name], at = preds[at:at + len(rows)], at + len(rows)
        out["with"] = out["learn"][self.with_rows]
        return out

    @torch.no_grad()
    def _latents(self, vae, recs, bucket, scaling) -> torch.Tensor:
        if not recs:
            return torch.empty(0)
        means = []
        for r in recs:  # one at a time, as the run's cache: at 1024 px an fp32 encode takes gigabytes
            pixels = ds.prepare_image(r.image, bucket, random_crop=False, flip=False, rng=random.Random(0))[0]
            means.append(vae.encode(pixels[None].to(vae.device, vae.dtype)).latent_dist.mean[0].float())
        return ((torch.stack(means) - scaling[1]) * scaling[0]).to(self.device, self.dtype)

    @torch.no_grad()
    def _predict(self, rows: list, strength: float) -> torch.Tensor:
        """The denoiser's predictions for `rows` with the adapters at `strength` (fp32, on the device)."""
        if not rows:
            return torch.empty(0)
        self.set_strength(strength)
        try:
            prompts = list(dict.fromkeys(r[3] for r in rows))  # each prompt encoded once
            hidden, pooled = self.family.encode(self.text_encoders, [ids.to(self.device) for ids in self._ids(prompts)],
                                                self.clip_skip)
            where = {p: i for i, p in enumerate(prompts)}
            out = []
            for i in range(0, len(rows), self.batch_size):
                chunk = rows[i:i + self.batch_size]
                pick = torch.tensor([where[r[3]] for r in chunk], device=self.device)
                t = torch.tensor([r[2] for r in chunk], device=self.device, dtype=self.t_dtype)
                noisy = self.objective.noisy(torch.stack([r[0] for r in chunk]), torch.stack([r[1] for r in chunk]), t)
                time_ids = None if self.time_ids is None else self.time_ids.to(self.device).expand(len(chunk), -1)
                pred = self.family.predict(self.denoiser, noisy, t, hidden[pick].to(self.dtype),
                                           None if pooled is None else pooled[pick].to(self.dtype), time_ids)
                out.append(pred.float())
            return torch.cat(out)
        finally:
            self.set_strength(1.0)

    def _ids(self, prompts: list[str]) -> list[torch.Tensor]:
        return [token_ids(tok, prompts, torch.device("cpu"), length)
                for tok, length in zip(self.tokenizers, self.family.token_lengths)]

    def _loss(self, rows: list, pred: torch.Tensor) -> float:
        latents = torch.stack([r[0] for r in rows])
        noise = torch.stack([r[1] for r in rows])
        t = torch.tensor([r[2] for r in rows], device=self.device, dtype=self.t_dtype)
        target = self.objective.target(latents, noise, t).float()
        return float(((pred - target) ** 2).mean())

    def measure(self, step: int, strengths=STRENGTHS) -> Measure:
        """The measures of the adapters as they are now."""
        return self._run(lambda: self._measure(step, strengths))

    def _measure(self, step: int, strengths) -> Measure:
        result = Measure(step)
        base_learn = self._loss(self.learn, self.base["learn"])
        for s in strengths:
            preds = self._predict_sets(s)
            changed = {k: float(((preds[k] - self.base[k]) ** 2).mean()) for k in ("with", "without")}
            result.strengths[float(s)] = {
                "learned": 1 - self._loss(self.learn, preds["learn"]) / base_learn,
                "bleed": changed["without"] / max(changed["with"], 1e-12),
            }
            if s == 1.0:
                loss = self._loss(self.learn, preds["learn"])
                if self.train:
                    result.heldout_loss, result.train_loss = loss, self._loss(self.train, preds["train"])
        return result


class _Remembered:
    """A text encoder the adapters leave alone, called as the model: each (token ids, options) computed once."""

    def __init__(self, model):
        self.model, self.seen = model, {}

    def __call__(self, ids: torch.Tensor, *args, **kwargs):
        key = (str(ids.device), tuple(ids.shape), ids.cpu().numpy().tobytes(), args, tuple(sorted(kwargs.items())))
        if key not in self.seen:
            self.seen[key] = self.model(ids, *args, **kwargs)
        return self.seen[key]

    def __getattr__(self, name):  # the model's own attributes (dtype, config, final_layer_norm, ...)
        if name in ("model", "seen"):
            raise AttributeError(name)
        return getattr(self.model, name)


def earlier_measures(run_dir: str | Path, step: int) -> list[Measure]:
    """The measures a run's `eval` events hold up to `step` (a resumed run's saves before it), the last per step."""
    from sdlora.rundir import read_events

    found = {}
    for e in read_events(run_dir):
        if e["type"] == "eval" and e["step"] <= step:
            found[e["step"]] = Measure(e["step"], {float(r["strength"]): {"learned": r["learned"], "bleed": r["bleed"]}
                                                   for r in e["strengths"]}, e.get("heldout_loss"), e.get("train_loss"))
    return [found[k] for k in sorted(found)]


def mark_overfit(measures: list[Measure]) -> None:
    """Set each measure's `overfit` from the ones before it: its held-out loss more than OVERFIT_RISE above the lowest
    so far while its training loss is below the one there. None without held-out pictures."""
    best = None
    for m in measures:
        if m.heldout_loss is None:
            m.overfit = None
            continue
        if best is None or m.heldout_loss < best.heldout_loss:
            best = m
        m.overfit = m.heldout_loss > best.heldout_loss * (1 + OVERFIT_RISE) and m.train_loss < best.train_loss


@dataclass
class Recommendation:
    step: int
    strength: float
    learned_share: float  # of the best learned over every save and strength
    bleed: float
    reason: str


def recommend(measures: list[Measure], name_of) -> Recommendation:
    """The save and strength to use: among saves that do not overfit, those within SHORTLIST of the best learned
    (each at its suggested strength); of these the one that bleeds least. `name_of(step)`: a save's file name."""
    mark_overfit(measures)
    fine = [m for m in measures if not m.overfit] or list(measures)
    picks = {m.step: (m.suggested(), m.strengths[m.suggested()]) for m in fine}
    best = max(p[1]["learned"] for p in picks.values())
    shortlist = [m for m in fine if best <= 0 or picks[m.step][1]["learned"] >= SHORTLIST * best]
    chosen = min(shortlist, key=lambda m: (picks[m.step][1]["bleed"], m.step))
    strength, numbers = picks[chosen.step]
    share = numbers["learned"] / best if best > 0 else 0.0
    reason = f"{name_of(chosen.step)} at {strength:g}: {share:.0%} of the best learned, bleed {numbers['bleed']:.0%}"
    later = [m for m in measures if m.step > chosen.step]
    if any(m.overfit for m in later):
        reason += "; later saves overfit"
    elif any(m in shortlist for m in later):
        reason += "; later saves bleed more"
    elif later:
        reason += "; later saves learned less"
    if best <= 0:
        reason += " (no save lowered the loss: train longer or at a higher learning rate)"
    return Recommendation(chosen.step, strength, share, numbers["bleed"], reason)


def event(measure: Measure, path: str, on: str) -> dict:
    """The `eval` event's fields for one save."""
    strength = measure.suggested()
    return {"step": measure.step, "path": path, "on": on, "suggested_strength": strength,
            "learned": measure.strengths[strength]["learned"], "bleed": measure.strengths[strength]["bleed"],
            "strengths": [{"strength": s, **m} for s, m in sorted(measure.strengths.items())],
            "heldout_loss": measure.heldout_loss, "train_loss": measure.train_loss}


def save_name(path: Path) -> str:
    """How a recommendation names a save file."""
    return "lora (the final save)" if path.name == "lora.safetensors" else path.stem


def evaluate_run(run_dir: str | Path, *, device: str | None = None, say=print) -> tuple[list, Recommendation]:
    """Measure every save of a finished (or stopped) run from its files, with the base its config names, and write
    the `eval` events and the `recommend` event to the run's events. Every adapter type sdlora trains."""
    from safetensors import safe_open

    from sdlora.config import TrainConfig
    from sdlora.errors import UserError
    from sdlora.generate import Previewer
    from sdlora.models import load_base
    from sdlora import objectives
    from sdlora.rundir import EventLog

    import warnings

    warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # one adapter per save, on purpose
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.json)", "give the folder `sdlora train --out` made")
    saves = sorted(run_dir.glob("lora-step-*.safetensors"))
    saves = [p for p in saves if not p.stem.endswith("-ema")] + \
        ([run_dir / "lora.safetensors"] if (run_dir / "lora.safetensors").is_file() else [])
    if not saves:
        raise UserError(f"no saved LoRA in {run_dir}", "train first, or wait for the run's first save")
    config = TrainConfig.from_file(run_dir / "config.json")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    say(f"loading {config.base} and {len(saves)} saves")
    base = load_base(config.base, base_config=config.base_config, prediction_type=config.prediction_type,
                     zero_terminal_snr=config.zero_terminal_snr)
    # each save put onto the base at each strength as previews put it: LoRA/LoCon through diffusers' loader, the types
    # it does not read whole (LoHa, LoKr, DoRA's magnitudes) into the base's weights
    previewer = Previewer(base, device=device)
    pipe, family = previewer.pipe, base.fam.with_train_guidance(config.train_guidance)
    steps = {}
    for i, path in enumerate(saves):
        with safe_open(str(path), "pt") as f:
            steps[int((f.metadata() or {}).get("ss_steps") or i)] = path
    current = [saves[0]]

    def set_strength(strength: float) -> None:
        previewer.set_loras([(str(current[0]), strength)])
    data = ds.ingest(config.dataset, trigger=config.trigger, caption_template=config.caption_template)
    records, heldout = split(data.records, config.eval_holdout, config.seed)
    resolution = config.resolution or base.resolution
    evaluator = Evaluator(denoiser=getattr(pipe, family.denoiser), text_encoders=family.encoders(pipe),
                          tokenizers=family.tokenizers(pipe), family=family, vae=pipe.vae,
                          objective=objectives.make(family, pipe.scheduler.config, config, device),
                          scaling=(pipe.vae.config.scaling_factor, getattr(pipe.vae.config, "shift_factor", None) or 0.0),
                          set_strength=set_strength, records=records, heldout=heldout, trigger=config.trigger,
                          resolution=resolution, clip_skip=family.resolve_clip_skip(config.clip_skip), seed=config.seed,
                          device=torch.device(device), batch_size=config.batch_size,
                          adapted_encoders=len(family.text_encoders) if config.train_text_encoder else 0)
    events = EventLog(run_dir)
    measures = []
    for step, path in steps.items():
        current[0] = path
        measure = evaluator.measure(step)
        measures.append(measure)
        shown = event(measure, str(path), evaluator.on)
        events.emit("eval", **shown, source="sdlora eval")
        say(f"{save_name(path)}: learned {shown['learned']:.1%} at strength {shown['suggested_strength']:g}, "
            f"bleed {shown['bleed']:.0%}")
    best = recommend(measures, lambda at: save_name(steps[at]))
    events.emit("recommend", path=str(steps[best.step]), step=best.step, strength=best.strength,
                learned_share=best.learned_share, bleed=best.bleed, reason=best.reason, on=evaluator.on,
                source="sdlora eval")
    return measures, best
