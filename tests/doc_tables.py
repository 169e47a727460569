"""The reference tables of docs/, generated from comfymgr so that they never
drift: the settings (docs/CONFIGURATION.md, from comfymgr._config_table())
and the metrics (docs/METRICS.md, from the registry and the live collector of
a running comfymgr with two stand-in GPUs, so that every family it can
export is there). `make readme` writes them; tests/test_readme.py checks them.

    .venv/bin/python tests/doc_tables.py        # what `make readme` runs
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import tempfile
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.metrics import MetricWrapperBase

# Run as a script (`make readme`): comfymgr and the tests' helpers from here.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_metrics import two_gpus

import comfymgr
from conftest import API_KEY, ROOT

CONFIGURATION = ROOT / "docs" / "CONFIGURATION.md"
METRICS = ROOT / "docs" / "METRICS.md"


def between(text: str, marker: str) -> str:
    """What stands between <!-- marker --> and <!-- /marker -->."""
    match = re.search(rf"<!-- {marker} -->\n(.*?)<!-- /{marker} -->", text, re.S)
    assert match, f"no <!-- {marker} --> block"
    return match.group(1)


def replace_between(text: str, marker: str, content: str) -> str:
    between(text, marker)  # there, once at least
    return re.sub(rf"(<!-- {marker} -->\n).*?(<!-- /{marker} -->)",
                  lambda m: m.group(1) + content + "\n" + m.group(2), text, flags=re.S)


# -- the metrics -------------------------------------------------------------------

async def exported_metrics() -> tuple[list[tuple[str, str, tuple[str, ...], str]], str]:
    """(name, type, label names, help) of every metric family, in the order
    comfymgr declares them, and the text of a scrape of the same comfymgr.

    Families of the live collector exist only while their subject does (no
    NVML, no GPU series): this comfymgr has a backend on GPU 0 and two GPUs
    behind a stand-in NVML, and waits until it has read them and measured
    its filesystems."""
    with tempfile.TemporaryDirectory() as tmp:
        config = comfymgr.Config.defaults(
            state_dir=Path(tmp) / "state", api_keys=(API_KEY,), rate_limit=0, port=0,
            host="127.0.0.1", backends=(comfymgr.BackendSpec("gpu0", "http://127.0.0.1:9", 0),))
        app = comfymgr.create_app(config, nvml=two_gpus())
        async with TestClient(TestServer(app)) as client:
            for _ in range(500):
                if app[comfymgr.GPUS].readings and app[comfymgr.FILES].filesystems:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("comfymgr never read its GPUs and filesystems")
            metrics = app[comfymgr.METRICS]
            rows = [(m._name, m._type, tuple(m._labelnames), m._documentation)
                    for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
            rows += [(f.name, f.type, tuple(f._labelnames), f.documentation)
                     for f in comfymgr._live_metrics(app)]
            text = await (await client.get("/metrics")).text()
    return rows, text


def shown_name(name: str, type_: str) -> str:
    """The name as a query writes it: counters end in _total."""
    return f"{name}_total" if type_ == "counter" else name


def metrics_table(rows) -> str:
    lines = ["| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
    for name, type_, labels, help_ in rows:
        shown = ", ".join(f"`{label}`" for label in labels) or "(none)"
        lines.append(f"| `{shown_name(name, type_)}` | {type_} | {shown} | {help_.replace('|', '/')} |")
    return "\n".join(lines)


# -- writing them ----------------------------------------------------------------------

def main() -> int:
    # The stand-in backend is never up: its connection errors are not news here.
    logging.getLogger("comfymgr").setLevel(logging.CRITICAL)
    CONFIGURATION.write_text(replace_between(CONFIGURATION.read_text(), "config-table",
                                             comfymgr._config_table()))
    rows, _ = asyncio.run(exported_metrics())
    METRICS.write_text(replace_between(METRICS.read_text(), "metrics-table", metrics_table(rows)))
    print(f"{CONFIGURATION.relative_to(ROOT)}: {len(comfymgr._SETTINGS)} settings; "
          f"{METRICS.relative_to(ROOT)}: {len(rows)} metrics")
    return 0


if __name__ == "__main__":
    sys.exit(main())
