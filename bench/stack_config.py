"""One synthetic stack (worker, gateway, Envoy on free loopback ports, quiet logs) for the benches that
run their own: the settings they share here, each bench's own on top."""

from __future__ import annotations

from pathlib import Path

import yaml

from igw_stack import launcher as stack


def synthetic_stack(work: Path, gateway: dict, worker: dict, envoy: dict | None = None):
    """Write ``work/config.yaml`` and return it as a dict, with the Processes that run it. ``gateway``,
    ``worker`` and ``envoy`` are added to (and override) the shared settings of each section."""
    cfg = {
        "gateway": {
            "listen": f"127.0.0.1:{stack.free_port()}",
            "metrics_listen": "",
            "http_listen": "",
            "log_level": "warning",
            **gateway,
        },
        "worker": {
            "listen": f"127.0.0.1:{stack.free_port()}",
            "engine": "synthetic",
            "metrics_listen": "",
            "log_level": "warning",
            **worker,
        },
        "envoy": {
            "listen": f"127.0.0.1:{stack.free_port()}",
            "admin_listen": f"127.0.0.1:{stack.free_port()}",
            **(envoy or {}),
        },
    }
    cfg["gateway"]["workers"] = [{"address": cfg["worker"]["listen"]}]
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    return cfg, stack.Processes(work / "config.yaml", log_dir=work)
