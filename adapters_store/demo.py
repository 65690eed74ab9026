"""``deltaclip demo`` (foundation edition): catalogue generated adapters for the tiny base.

It exercises the whole store path a trained adapter takes — migrate, write a v1 file, validate,
store the blob, register, alias, list — in a few seconds, without data or downloads.
"""

from __future__ import annotations

from tqdm import tqdm

from .adapter import dtype_name
from .bases import TINY, build_base, signature_of
from .catalog import upgrade
from .codec import write_adapter
from .config import StoreSettings
from .registry import Registry
from .synthetic import random_adapter


def run_demo(settings: StoreSettings) -> int:
    settings = settings.model_copy(update={"base_model": TINY[0], "base_pretrained": TINY[1]})
    print(f"[1/4] catalog: {settings.resolved_database_url}")
    upgrade(settings.resolved_database_url)
    print(f"[2/4] base: {TINY[0]}/{TINY[1]} (a tiny seeded model; no weights are downloaded)")
    net = build_base(*TINY)
    sig = signature_of(net, *TINY)
    print(f"      fingerprint {sig.fingerprint}")
    reg = Registry.from_settings(settings)
    out_dir = settings.home / "demo-adapters"
    tasks = [("photo2sketch", 0.005), ("synthetic2real", 0.001), ("day2night", 0.0005)]
    print(f"[3/4] writing and registering {len(tasks)} generated adapters from {out_dir}")
    for i, (task, density) in enumerate(tqdm(tasks, unit="adapter")):
        adapter = random_adapter(net, sig, task, density=density, seed=i)
        path = write_adapter(adapter, out_dir / f"{task}.safetensors")
        result = reg.register(path.read_bytes(), sig, alias="production")
        state = "new" if result.created else "unchanged"
        tqdm.write(
            f"      {task} v{result.record.version} ({state}): {adapter.meta.nnz} weights "
            f"({adapter.meta.density:.3%}, {dtype_name(adapter.residual[next(iter(adapter.residual))].values.dtype)}), "
            f"{result.record.size_bytes} bytes"
        )
    print("[4/4] the catalog now holds:")
    page = reg.list(limit=20)
    for r in page.items:
        print(
            f"      {r.task:<16} v{r.version}  aliases={','.join(r.aliases) or '-':<10} digest={r.digest[:16]}…"
        )
    print(
        f"next: `deltaclip adapters list --json` or `deltaclip adapters show photo2sketch` (DELTACLIP_HOME={settings.home})"
    )
    reg.close()
    return 0
