"""A run's saves: each adapter file with its metadata and a checkpoint beside it, and the final file checked before done."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch

from sdlora import adapters, checkpoints
from sdlora.diskspace import writing
from sdlora.export import check_file, kohya_metadata, verify, write_diffusers_layout
from sdlora.lora import kohya_modules, kohya_state_dict, save_lora
from sdlora.models import load_base


class Saves:
    """Writes `lora-step-NNNNNN.safetensors` (or the final `lora.safetensors`) from the adapters as they are, a
    resumable checkpoint with each, and checks the final file through diffusers' own loader. A save first waits for
    every loss: it never keeps weights that a NaN has already reached."""

    def __init__(self, accelerator, config, base, family, trained, run_dir: Path, events, losses, *, resolution: int,
                 num_images: int, tag_frequency: dict, epoch_batches: int, started_at: float, weights=None,
                 ema=None, reg_dirs: dict | None = None):
        self.accelerator, self.config, self.base, self.family = accelerator, config, base, family
        self.trained, self.run_dir, self.events, self.losses = trained, run_dir, events, losses
        self.resolution, self.num_images, self.tag_frequency = resolution, num_images, tag_frequency
        self.epoch_batches, self.started_at = epoch_batches, started_at
        self.reg_dirs = reg_dirs or {}  # the regularisation pictures' folders (sdlora.dataset.dataset_dirs)
        self.fresh_base = None  # a future of a fresh copy of the base for the final check (see preload)
        # a context within which the adapters hold the weights to save (Step.averaged_weights); checkpoints keep the
        # optimizer's own
        self.weights = weights or contextlib.nullcontext
        self.ema = ema  # an sdlora.ema.EMA: each file gets a *-ema.safetensors twin

    def path(self, step: int, final: bool = False) -> Path:
        """The file a save at `step` writes."""
        return self.run_dir / ("lora.safetensors" if final else f"lora-step-{step:06d}.safetensors")

    def save(self, step: int, final: bool = False, metadata: dict | None = None) -> Path:
        """Write the adapters as they are (`metadata`: fields added to the file's, e.g. the suggested strength)."""
        config, run_dir = self.config, self.run_dir
        path = self.path(step, final)
        self.losses.read(wait=True)  # never save weights that a NaN has already reached
        if self.accelerator.is_main_process:
            meta = kohya_metadata(config, family=self.base.family, resolution=self.resolution, step=step,
                                  epochs=step * config.grad_accum / self.epoch_batches, num_images=self.num_images,
                                  tag_frequency=self.tag_frequency, started_at=self.started_at,
                                  title=config.title or run_dir.name, precision=self.accelerator.mixed_precision,
                                  prediction_type=self.base.prediction_type,
                                  zero_terminal_snr=self.base.zero_terminal_snr,
                                  clip_skip=self.family.resolve_clip_skip(config.clip_skip), reg_dirs=self.reg_dirs)
            meta.update(metadata or {})
            unet, text_encoders = self.trained[0], self.trained[1:]
            with self.weights():
                state = self._state_dict()
            size = sum(t.numel() * t.element_size() for t in state.values())
            with writing(run_dir, size, run_dir):
                save_lora(path, state, meta)  # a temporary name, then the rename: a failed write keeps the last file
            if final and config.export_diffusers:
                diffusers_file = run_dir / "lora-diffusers.safetensors"
                with writing(run_dir, size, run_dir, leftovers=[diffusers_file]), self.weights():  # written in place
                    write_diffusers_layout(diffusers_file, unet, text_encoders, config, family=self.base.family)
            if self.ema is not None:
                with self.ema.swapped():
                    state = self._state_dict()
                with writing(run_dir, size, run_dir):
                    save_lora(ema_file(path), state, {**meta, "ss_output_name": ema_file(path).stem,
                                                      "modelspec.title": f"{meta['modelspec.title']} (EMA)",
                                                      "sdlora_ema_decay": str(config.ema_decay)})
            self.events.emit("save", step=step, path=str(path),
                             **({"ema_path": str(ema_file(path))} if self.ema is not None else {}))
        checkpoints.save(self.accelerator, run_dir / "checkpoints", step, self.trained, config.keep_checkpoints,
                         run_dir, ema=self.ema)
        if not final:
            self.losses.last_good = path
        return path

    def _state_dict(self) -> dict:
        """The adapters as they are now, in the kohya layout (copies: the weights may change in place after)."""
        unet, text_encoders = self.trained[0], self.trained[1:]
        state = kohya_state_dict(unet, dict(zip(self.base.text_encoders(), text_encoders)),
                                 sgm_unet=self.family.sgm_unet, adapter=adapters.for_config(self.config),
                                 family=self.family)
        return self.family.file_state_dict(state)  # SD3.5: diffusers' peft layout, alpha folded

    def preload(self, pipe) -> None:
        """Start loading a fresh copy of the base for the final check in a background thread, when the host has the
        memory for it (twice the model's fp32 size free); otherwise the check loads it then."""
        import concurrent.futures

        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not Linux
            return
        need = 4 * sum(p.numel() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                       for p in m.parameters())
        if available < 2 * need:
            return
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sdlora-verify-base")
        self.fresh_base = pool.submit(load_base, self.config.base, base_config=self.config.base_config,
                                      prediction_type=self.config.prediction_type,
                                      zero_terminal_snr=self.config.zero_terminal_snr)
        pool.shutdown(wait=False)

    def check(self, path: Path, kind: str, step: int) -> None:
        """Reload the final file through diffusers' loader into a fresh base (the `verify` event), then the run's
        last event (`done` or `stopped`); a file that does not pass stops the run with an error."""
        if self.accelerator.is_main_process:
            t = time.perf_counter()
            result = verify(path, self.config.base, base_config=self.config.base_config,
                            prediction_type=self.config.prediction_type,
                            zero_terminal_snr=self.config.zero_terminal_snr,
                            base=self.fresh_base.result() if self.fresh_base is not None else None)
            # and the file read back by the adapter type's own reader against the trained layers themselves: each
            # module's change at strength 1 (DoRA's magnitudes too, which diffusers does not read), none at 0
            unet, text_encoders = self.trained[0], self.trained[1:]
            adapter = adapters.for_config(self.config)
            with self.weights():
                result["file_check"] = check_file(path, kohya_modules(
                    unet, dict(zip(self.base.text_encoders(), text_encoders)), self.family.sgm_unet, adapter,
                    self.family), adapter)
            result["ok"] = result["ok"] and result["file_check"]["ok"]
            self.events.emit("verify", **result, seconds=round(time.perf_counter() - t, 2),
                             preloaded=self.fresh_base is not None)
            if not result["ok"]:
                raise RuntimeError(f"export check failed for {path.name}: {result}")
            if self.ema is not None:  # the EMA file is shared too: checked the same way
                ema_result = verify(ema_file(path), self.config.base, base_config=self.config.base_config,
                                    prediction_type=self.config.prediction_type,
                                    zero_terminal_snr=self.config.zero_terminal_snr)
                self.events.emit("verify", **ema_result)
                if not ema_result["ok"]:
                    raise RuntimeError(f"export check failed for {ema_file(path).name}: {ema_result}")
            self.events.emit(kind, step=step, path=str(path))
        self.accelerator.wait_for_everyone()


def ema_file(path: Path) -> Path:
    """`lora.safetensors` -> `lora-ema.safetensors`: where a file's EMA twin is written."""
    return path.with_name(f"{path.stem}-ema{path.suffix}")
