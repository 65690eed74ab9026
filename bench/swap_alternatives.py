"""The alternatives ``python -m bench swap`` times deltaclip's switch against: dense task copies
(``load_state_dict`` from memory and from safetensors files) and PEFT LoRA at a matched parameter
count (``set_adapter``, both hotswaps, merge/unmerge, the unmerged forward)."""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from adapters_store.adapter import Adapter, merge_state
from bench.harness import Blocks
from bench.lora import build_peft, lora_state


def alternate(fns: list[Callable[[], Any]]) -> Callable[[], None]:
    """One call runs the next of ``fns`` in turn: with two, every call is a task switch."""
    state = [len(fns) - 1]

    def step() -> None:
        state[0] = (state[0] + 1) % len(fns)
        fns[state[0]]()

    return step


class Alternatives:
    """Dense task copies and PEFT LoRA set up once, timed in every repetition of :func:`swap`."""

    def __init__(
        self,
        base_visual: Any,
        adapters: dict[float, list[Adapter]],
        ranks: dict[float, int],
        args: argparse.Namespace,
    ) -> None:
        from safetensors.torch import save_file

        self.device = args.device
        self.tmp = tempfile.TemporaryDirectory()
        # dense copies: one tower, two merged task states (the same for every density: a dense
        # copy costs the same whatever changed), in memory and as safetensors files
        self.dense = copy.deepcopy(base_visual).to(self.device)
        base_state = {f"visual.{k}": v.detach().cpu() for k, v in self.dense.state_dict().items()}
        mid = adapters[0.005] if 0.005 in adapters else next(iter(adapters.values()))
        self.dense_states = [
            {
                k.removeprefix("visual."): v.contiguous()
                for k, v in merge_state(base_state, a).items()
            }
            for a in mid
        ]
        self.files = [Path(self.tmp.name) / f"task{i}.safetensors" for i in range(len(mid))]
        for path, st in zip(self.files, self.dense_states, strict=True):
            save_file(st, str(path))
        # PEFT LoRA at the matched ranks, two adapters each, saved and in memory
        self.ranks = sorted(set(ranks.values()))
        self.pm = build_peft(
            base_visual, {r: [f"r{r}a", f"r{r}b"] for r in self.ranks}, self.device, torch.float32
        )
        self.saved = {}
        for r in self.ranks:
            self.pm.save_pretrained(self.tmp.name, selected_adapters=[f"r{r}a", f"r{r}b"])
            self.saved[r] = [Path(self.tmp.name) / f"r{r}a", Path(self.tmp.name) / f"r{r}b"]
        self.states = {
            r: [lora_state(self.pm, f"r{r}a", f"r{r}a"), lora_state(self.pm, f"r{r}b", f"r{r}a")]
            for r in self.ranks
        }
        self.configs = {r: self.pm.peft_config[f"r{r}a"] for r in self.ranks}

    def time(
        self, blocks: Blocks, engine: Any, x: torch.Tensor, n: dict[str, int], methods: set[str]
    ) -> None:
        from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
        from safetensors.torch import load_file

        def reload(path: Path) -> None:
            self.dense.load_state_dict(load_file(str(path)))

        if "dense" in methods:
            blocks.time(
                "dense_load_state_dict",
                alternate([partial(self.dense.load_state_dict, st) for st in self.dense_states]),
                n["slow"],
            )
            blocks.time(
                "dense_reload_file", alternate([partial(reload, f) for f in self.files]), n["slow"]
            )
        if "peft" not in methods:
            return
        pm = self.pm

        def lora_forward() -> None:
            with torch.inference_mode():
                pm(x)

        def merge_switch(target: str) -> None:
            pm.base_model.unmerge_adapter()
            pm.base_model.merge_adapter([target])

        for r in self.ranks:
            a, b = f"r{r}a", f"r{r}b"
            pm.set_adapter(a)
            blocks.time_pair(
                (f"forward_b1_pair@r{r}", f"lora_forward_b1@r{r}"),
                (lambda: engine.features(x), lora_forward),
                n["slow"],
            )
            blocks.time(
                f"peft_set_adapter@r{r}",
                alternate([partial(pm.set_adapter, t) for t in (a, b)]),
                n["fast"],
            )
            pm.set_adapter(a)
            blocks.time(
                f"peft_hotswap_state_dict@r{r}",
                alternate(
                    [
                        partial(hotswap_adapter_from_state_dict, pm, st, a, self.configs[r])
                        for st in self.states[r]
                    ]
                ),
                n["mid"],
            )
            blocks.time(
                f"peft_hotswap_file@r{r}",
                alternate(
                    [
                        partial(hotswap_adapter, pm, str(f), a, torch_device=self.device)
                        for f in self.saved[r]
                    ]
                ),
                n["mid"],
            )
            hotswap_adapter_from_state_dict(pm, self.states[r][0], a, self.configs[r])
            pm.base_model.merge_adapter([a])
            blocks.time(
                f"peft_merge_unmerge@r{r}",
                alternate([partial(merge_switch, t) for t in (a, b)]),
                n["slow"],
            )
            pm.base_model.unmerge_adapter()

    def close(self) -> None:
        self.tmp.cleanup()
