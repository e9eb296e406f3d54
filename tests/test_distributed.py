"""Distributed runs without hangs: a failure on one rank ends every rank with the same error; warnings print once."""

import os
import socket
import warnings

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from scale_common import errors
from scale_common.distributed import distributed, raise_together
from scale_common.errors import ToolkitError


class _FailsOnRankOne(nn.Module):
    """A small CNN whose second conv raises on rank 1 from its third call on (the dry trace pass is the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        self.calls += 1
        if dist.get_rank() == 1 and self.calls >= 3:
            raise RuntimeError("out of memory on purpose")
        return self.conv2(torch.relu(y))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from cka_scale.analyze import AnalyzeConfig, analyze

    model = _FailsOnRankOne()
    cfg = AnalyzeConfig(model="tiny", weights="none", data="textures", images=16, batch_size=4, scales=(16, 32),
                        layers="conv1,conv2", device="cpu")
    data_config = timm.data.resolve_data_config({"input_size": (3, 32, 32)})
    try:
        analyze(cfg, model=model, data_config=data_config, progress=False)
        outcome = "finished"
    except ToolkitError as err:
        outcome = f"ToolkitError: {err}"
    except Exception as err:  # the test reads what each rank saw
        outcome = f"{type(err).__name__}: {err}"
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(outcome)


def test_a_failing_rank_ends_both_with_the_same_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx = mp.start_processes(_rank_main, args=(_free_port(), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    try:
        finished = False
        for _ in range(180):  # a hang (the bug this guards against) ends here as a failure after 3 minutes
            if ctx.join(timeout=1):
                finished = True
                break
        assert finished, "the ranks did not end: a rank is waiting in a collective"
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.terminate()
    outcomes = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert outcomes[0] == outcomes[1], outcomes
    assert outcomes[0].startswith("ToolkitError: rank 1 of 2 failed: RuntimeError: out of memory on purpose")


def test_one_process_re_raises_its_own_error():
    raise_together(None)
    with pytest.raises(KeyError):
        raise_together(KeyError("k"))


def test_warnings_print_once_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    errors._one_line_warning("careful", UserWarning, "f.py", 1)
    monkeypatch.setenv("RANK", "0")
    errors._one_line_warning("careful", UserWarning, "f.py", 1)
    assert capsys.readouterr().err == "warning: careful\n"


def test_a_single_process_context_keeps_warnings(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed("cpu") as ctx, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn("seen", UserWarning, stacklevel=1)
    assert ctx.is_main and len(caught) == 1
