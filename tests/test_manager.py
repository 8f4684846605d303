"""CheckpointManager: full state round trips, load failures, retention and best checkpoints
with async saves in flight, failures surfacing, HF export. Real node writer processes."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import faulty_fs  # noqa: F401  (registers faulty:// in this process)
import pytest
import torch
from helpers_models import TiedLM, TinyMLP, assert_bitwise_equal
from torch import nn

from ckptsvc.compat.training_state import NamedStates, SimpleStatefulProvider, TrainingProgress
from ckptsvc.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CommitConflictError,
    SaveFailedError,
    StateMismatchError,
)
from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME
from ckptsvc.manager import CheckpointConfig, CheckpointManager
from ckptsvc.ops.best_checkpoints import BestCheckpoints, Retention
from ckptsvc.ops.tiered_saves import TieringConfig
from ckptsvc.read.discovery import CheckpointStatus, list_checkpoints, next_checkpoint_path
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.sharded_checkpoint import save_checkpoint
from ckptsvc.stage.components import RNGState, SharingPattern, StateComponent

pytestmark = pytest.mark.usefixtures("node")  # a private node writer per test (conftest)


class Counter:
    """A Stateful callback with a name."""

    def __init__(self, name: str, value: int = 0) -> None:
        self.name = name
        self.value = value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.value = int(sd["value"])


class Trainer:
    """A tiny trainer: model, optimizer, scheduler, progress, RNG; one step = one update."""

    def __init__(self, seed: int = 0, *, extra: dict[str, Any] | None = None) -> None:
        torch.manual_seed(seed)
        self.model = TinyMLP(seed=seed)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.StepLR(self.opt, step_size=2, gamma=0.5)
        self.progress = TrainingProgress()
        self.statefuls: dict[str, Any] = {
            "optimizer": self.opt,
            "scheduler": self.sched,
            "progress": self.progress,
            "rng": RNGState(),
            **(extra or {}),
        }
        self.provider = SimpleStatefulProvider(self.statefuls)

    def step(self) -> float:
        x = torch.randn(4, 16)
        loss = self.model(x).pow(2).mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.progress.global_step += 1
        return float(loss.detach())

    def manager(self, root: str, **kw: Any) -> CheckpointManager:
        cfg_keys = {
            "save_total_limit",
            "storage_options",
            "async_save",
            "save_safetensors",
            "memory_budget_bytes",
        }
        cfg = CheckpointConfig(
            output_dir=root,
            save_total_limit=kw.pop("save_total_limit", None),
            **{k: kw.pop(k) for k in list(kw) if k in cfg_keys},
        )
        return CheckpointManager(
            config=cfg, stateful_provider=self.provider, model=self.model, **kw
        )


def test_save_returns_the_path_and_load_restores_everything(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    t = Trainer(0)
    cbs = [Counter("early_stop", 3), Counter("logger", 7)]
    with t.manager(root, callbacks=cbs) as m:
        for _ in range(3):
            t.step()
        path = m.save_checkpoint(checkpoint_id=3)
        assert path == os.path.join(root, "checkpoints", "checkpoint-3")
    assert verify_checkpoint(path, deep=True).ok
    fresh = Trainer(1)
    # callbacks in another order: restored by name, not by position
    new_cbs = [Counter("logger"), Counter("early_stop")]
    with fresh.manager(root, callbacks=new_cbs) as m2:
        assert m2.load_checkpoint() == path
    for k, v in t.model.state_dict().items():
        assert_bitwise_equal(fresh.model.state_dict()[k], v, name=k)
    assert fresh.opt.state_dict()["param_groups"] == t.opt.state_dict()["param_groups"]
    for pid, st in t.opt.state_dict()["state"].items():
        for k, v in st.items():
            assert_bitwise_equal(fresh.opt.state_dict()["state"][pid][k], v, name=f"{pid}.{k}")
    assert fresh.sched.state_dict() == t.sched.state_dict()
    assert fresh.progress.global_step == 3
    assert [c.value for c in new_cbs] == [7, 3]
    assert torch.equal(torch.get_rng_state(), RNGState().state_dict()["torch_cpu"])


def test_latest_is_loaded_by_default_and_step_comes_from_the_id(tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    t = Trainer(0)
    with t.manager(root) as m:
        for step in (1, 2, 3):
            t.step()
            m.save_checkpoint(checkpoint_id=step)
        # "latest" includes saves still pending in this manager
        assert m.resolve_checkpoint_path(None) == os.path.join(root, "checkpoints", "checkpoint-3")
    infos = list_checkpoints(root)
    assert [i.step for i in infos] == [1, 2, 3]
    fresh = Trainer(1)
    with fresh.manager(root) as m2:
        m2.load_checkpoint()
    assert fresh.progress.global_step == 3


def test_tied_model_round_trip_keeps_the_tie(tmp_path: Path) -> None:
    model = TiedLM(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    provider = SimpleStatefulProvider({"optimizer": opt})
    cfg = CheckpointConfig(output_dir=str(tmp_path), save_total_limit=None)
    with CheckpointManager(config=cfg, stateful_provider=provider, model=model) as m:
        path = m.save_checkpoint(checkpoint_id=1)
    fresh = TiedLM(seed=5)
    opt2 = torch.optim.SGD(fresh.parameters(), lr=0.1)
    with CheckpointManager(
        config=cfg, stateful_provider=SimpleStatefulProvider({"optimizer": opt2}), model=fresh
    ) as m2:
        m2.load_checkpoint(path)
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    # parameters were copied in place: the optimizer still owns the model's tensors
    assert opt2.param_groups[0]["params"][0] is fresh.embed.weight


def test_missing_required_component_is_an_error_optional_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = str(tmp_path)
    t = Trainer(0)
    with t.manager(root) as m:
        m.save_checkpoint(checkpoint_id=1)
    extra = Trainer(1, extra={"ema": TrainingProgress()})
    with extra.manager(root) as m2, pytest.raises(StateMismatchError, match="ema"):
        m2.load_checkpoint()
    optional = Trainer(1, extra={"ema": TrainingProgress()})
    optional.provider = SimpleStatefulProvider(optional.statefuls, optional=["ema"])
    with optional.manager(root) as m3:
        m3.load_checkpoint()
    assert optional.progress.global_step == 0 and "ema" in caplog.text


def test_a_failing_load_state_dict_is_an_error(tmp_path: Path) -> None:
    class Broken(TrainingProgress):
        def load_state_dict(self, state_dict: Any) -> None:
            raise ValueError("incompatible")

    t = Trainer(0, extra={"custom": TrainingProgress()})
    with t.manager(str(tmp_path)) as m:
        m.save_checkpoint(checkpoint_id=1)
    bad = Trainer(0, extra={"custom": Broken()})
    with bad.manager(str(tmp_path)) as m2, pytest.raises(StateMismatchError, match="custom"):
        m2.load_checkpoint()


def test_a_different_model_is_an_error(tmp_path: Path) -> None:
    t = Trainer(0)
    with t.manager(str(tmp_path)) as m:
        m.save_checkpoint(checkpoint_id=1)
    other = Trainer(0)
    other.model.fc3 = nn.Linear(2, 2)  # a key the checkpoint lacks
    with other.manager(str(tmp_path)) as m2, pytest.raises(StateMismatchError, match="fc3"):
        m2.load_checkpoint()


def test_nothing_to_load_raises(tmp_path: Path) -> None:
    t = Trainer(0)
    with t.manager(str(tmp_path)) as m:
        assert m.resolve_checkpoint_path(None) is None
        assert m.resolve_checkpoint_path(str(tmp_path / "nope")) is None
        with pytest.raises(CheckpointNotFoundError):
            m.load_checkpoint()


def test_unsupported_options_fail_at_construction(tmp_path: Path) -> None:
    t = Trainer(0)
    cfg = CheckpointConfig(output_dir=str(tmp_path), save_total_limit=1, save_on_each_node=True)
    with pytest.raises(CheckpointError, match="not supported"):
        CheckpointManager(config=cfg, stateful_provider=t.provider, model=t.model)


def test_duplicate_callback_names_are_rejected(tmp_path: Path) -> None:
    t = Trainer(0)
    with pytest.raises(ValueError, match="both named"):
        t.manager(str(tmp_path), callbacks=[Counter("a"), Counter("a")])


def test_trainer_callbacks_attribute_is_used(tmp_path: Path) -> None:
    class FakeTrainer:
        callbacks = [Counter("a", 5), object()]  # non-Stateful callbacks are skipped

    t = Trainer(0)
    with t.manager(str(tmp_path)) as m:
        m.trainer = FakeTrainer()
        path = m.save_checkpoint(checkpoint_id=1)
    doc = json.loads(Path(path, "callbacks_state.json").read_text())
    assert doc["state"] == {"a": {"value": 5}}


# ---- retention and best checkpoints ------------------------------------------------------


def _complete(root: str, **opts: Any) -> list[str]:
    return [
        i.location.name
        for i in list_checkpoints(root, storage_options=opts or None)
        if i.status is CheckpointStatus.COMPLETE
    ]


def test_retention_keeps_the_limit_and_the_best(tmp_path: Path) -> None:
    root = str(tmp_path)
    t = Trainer(0)
    with t.manager(root, save_total_limit=2) as m:
        for step in range(1, 7):
            t.step()
            path = os.path.join(root, "checkpoints", f"checkpoint-{step}")
            # step 2 has the best eval loss
            m.update_best_checkpoints(path, {"eval_loss": abs(step - 2) + 0.5}, "loss", None, 1)
            assert m.save_checkpoint(checkpoint_id=step) == path
        m.wait()
        assert m.best_checkpoints == [(os.path.join(root, "checkpoints", "checkpoint-2"), 0.5)]
    assert _complete(root) == ["checkpoint-2", "checkpoint-6"]


def test_retention_with_saves_in_flight_and_an_overwrite(tmp_path: Path) -> None:
    """Slow storage holds saves in flight while retention runs; a resumed run re-saving an
    existing checkpoint (checkpoint-2) ends with that checkpoint intact and complete."""
    gate = tmp_path / "gate"
    opts = {"gate_path": str(gate)}
    root = f"faulty://{tmp_path}/run"
    t = Trainer(0)
    budget = 64 << 20  # two copies of the state fit: two saves are held in flight at once
    with t.manager(root, save_total_limit=2, storage_options=opts, memory_budget_bytes=budget) as m:
        for step in (1, 2, 3):
            t.step()
            m.save_checkpoint(checkpoint_id=step)
        m.wait()
        assert _complete(root, **opts) == ["checkpoint-2", "checkpoint-3"]
        gate.touch()
        try:
            t.step()
            m.save_checkpoint(checkpoint_id=4)
            t.step()
            again = m.save_checkpoint(root + "/checkpoints/checkpoint-2", step=5)
            (tmp_path / "run" / "checkpoints" / "checkpoint-9").mkdir()
            (tmp_path / "run" / "checkpoints" / "checkpoint-9" / MARKER_NAME).write_text("{}")
            assert not m.last_handle.done()
        finally:
            gate.unlink()
        m.wait()
    assert _complete(root, **opts) == ["checkpoint-4", "checkpoint-2"]  # oldest first
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-9").exists()  # incomplete: kept
    assert verify_checkpoint(again, deep=True, storage_options=opts).ok
    fresh = Trainer(3)
    with fresh.manager(root, storage_options=opts) as m2:
        m2.load_checkpoint(again)
    assert fresh.progress.global_step == 5


def test_retention_keeps_up_with_back_to_back_saves(tmp_path: Path) -> None:
    """Thirty saves back to back with save_total_limit=3: at every moment a watcher looks,
    the complete checkpoints are at most 3 + the saves in flight (a committed save counts
    until the retention pass that makes room for it is done); 3 remain at the end. The old
    retention queued one full pass per commit and reached 3 + 7."""
    root = str(tmp_path / "run")
    t = Trainer(0)
    worst: list[int] = []
    stop = threading.Event()

    def watch(m: CheckpointManager) -> None:
        while not stop.is_set():
            in_flight = m._retention.in_flight()  # read first: it only drops after deletes
            complete = len(list(tmp_path.glob("run/checkpoints/*/" + MANIFEST_NAME)))
            worst.append(complete - in_flight)

    with t.manager(root, save_total_limit=3) as m:
        watcher = threading.Thread(target=watch, args=(m,))
        watcher.start()
        try:
            for step in range(1, 31):
                t.step()
                m.save_checkpoint(checkpoint_id=step)
            m.wait()
        finally:
            stop.set()
            watcher.join()
    assert worst and max(worst) <= 3, max(worst)
    assert _complete(root) == ["checkpoint-28", "checkpoint-29", "checkpoint-30"]


class DoneHandle:
    def __init__(self, path: str) -> None:
        self.path = path

    def exception(self, timeout_s: float | None = None) -> BaseException | None:
        return None


def test_retention_skips_a_checkpoint_whose_save_is_queued(tmp_path: Path) -> None:
    """A save to an existing complete checkpoint's path is queued (its writer has not
    marked the directory yet) when a retention pass picks that checkpoint as the oldest:
    the pass leaves it alone; once the save is done, the next pass may delete."""
    root = str(tmp_path)
    paths = [next_checkpoint_path(root, i) for i in (1, 2, 3)]
    for i, p in enumerate(paths):
        save_checkpoint(p, {"w": torch.full((4,), float(i))}, step=i + 1)
    retention = Retention(root, keep=2, preserved=list)
    try:
        retention.begin_save(paths[0])  # the queued overwrite
        retention.after_save(DoneHandle(paths[2]))
        retention.wait()
        assert _complete(root) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
        retention.after_save(DoneHandle(paths[0]))  # the overwrite is done (no newer data here)
        retention.wait()
        assert _complete(root) == ["checkpoint-2", "checkpoint-3"]
    finally:
        retention.close()


def test_best_checkpoints_survive_a_restart_and_drop_deleted_ones(tmp_path: Path) -> None:
    root = str(tmp_path)
    t = Trainer(0)
    ck = [os.path.join(root, "checkpoints", f"checkpoint-{i}") for i in range(1, 4)]
    with t.manager(root) as m:
        m.update_best_checkpoints(ck[0], {"accuracy": 0.9}, "accuracy", None, 2)
        m.save_checkpoint(checkpoint_id=1)
        m.update_best_checkpoints(ck[1], {"accuracy": 0.8}, "accuracy", None, 2)
        m.save_checkpoint(checkpoint_id=2)
        m.save_checkpoint(checkpoint_id=3)
    import shutil

    shutil.rmtree(ck[1])
    fresh = Trainer(1)
    with fresh.manager(root) as m2:
        m2.load_checkpoint(ck[2])
        assert m2.best_checkpoints == [(ck[0], 0.9)]


def test_update_best_checkpoints_rules() -> None:
    best = BestCheckpoints()
    assert best.update("a", {"acc": 0.5}, "acc", True, 2)
    assert best.update("b", {"acc": 0.7}, "acc", True, 2)
    # Forgather compared against the *best* of the list here and refused 0.6
    assert best.update("c", {"acc": 0.6}, "acc", True, 2)
    assert best.entries == [("b", 0.7), ("c", 0.6)]
    assert not best.update("d", {"acc": 0.1}, "acc", True, 2)
    low = BestCheckpoints()
    assert low.update("x", {"eval_loss": 0.0}, "loss", None, 1)  # 0.0 counts; loss: lower wins
    assert not low.update("y", {"eval_loss": 0.5}, "loss", None, 1)
    assert not low.update("z", {"other": 1.0}, "loss", None, 1)
    assert not low.update("n", {"loss": float("nan")}, "loss", None, 1)
    assert low.paths() == ["x"]
    low.best_checkpoint = "legacy-best"
    assert low.paths() == ["x", "legacy-best"]


# ---- failures surface ---------------------------------------------------------------------


def test_failed_save_raises_from_wait_and_from_the_next_save(tmp_path: Path) -> None:
    fail = tmp_path / "fail"
    opts = {"fail_path": str(fail)}
    root = f"faulty://{tmp_path}/run"
    t = Trainer(0)
    m = t.manager(root, storage_options=opts)
    fail.touch()
    m.save_checkpoint(checkpoint_id=1)
    with pytest.raises(SaveFailedError, match="injected I/O error"):
        m.wait()
    m.wait()  # reported once
    m.save_checkpoint(checkpoint_id=2)
    m.last_handle.exception(60)
    fail.unlink()
    with pytest.raises(SaveFailedError, match="checkpoint-2"):
        m.save_checkpoint(checkpoint_id=3)
    m.save_checkpoint(checkpoint_id=3)
    m.close()
    assert _complete(root, **opts) == ["checkpoint-3"]


def test_context_manager_raises_a_failure_of_the_last_save(tmp_path: Path) -> None:
    fail = tmp_path / "fail"
    fail.touch()
    t = Trainer(0)
    opts = {"fail_path": str(fail)}
    with (
        pytest.raises(SaveFailedError),
        t.manager(f"faulty://{tmp_path}/run", storage_options=opts) as m,
    ):
        m.save_checkpoint(checkpoint_id=1)


def test_sync_mode_returns_once_committed(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    t = Trainer(0)
    root = f"faulty://{tmp_path}/run"
    with t.manager(root, async_save=False, storage_options={"gate_path": str(gate)}) as m:
        done: list[str] = []
        worker = threading.Thread(target=lambda: done.append(m.save_checkpoint(checkpoint_id=1)))
        worker.start()
        worker.join(1.0)
        assert worker.is_alive(), "a synchronous save must wait for the (blocked) storage"
        gate.unlink()
        worker.join(60)
        assert done and (tmp_path / "run" / "checkpoints" / "checkpoint-1" / MANIFEST_NAME).exists()


def test_saving_to_a_path_in_flight_is_refused(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    t = Trainer(0)
    with t.manager(f"faulty://{tmp_path}/run", storage_options={"gate_path": str(gate)}) as m:
        m.save_checkpoint(checkpoint_id=1)
        with pytest.raises(CommitConflictError):
            m.save_checkpoint(checkpoint_id=1)
        gate.unlink()


# ---- HF export -----------------------------------------------------------------------------


def test_save_model_exports_hf_with_config(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    out = str(tmp_path / "export")
    provider = SimpleStatefulProvider({})
    cfg = CheckpointConfig(output_dir=str(tmp_path / "run"), save_total_limit=None)
    with CheckpointManager(config=cfg, stateful_provider=provider, model=model) as m:
        m.save_model(out)
        with pytest.raises(CommitConflictError):
            m.save_model(out)
        m.save_model(out, overwrite_output_dir=True)
    assert json.loads(Path(out, "config.json").read_text())["n_embd"] == 16
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(8).unsqueeze(0)
    model.eval()
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_manager_checkpoints_load_with_from_pretrained(tmp_path: Path, node: str) -> None:
    """A checkpoint the manager saves holds config.json: from_pretrained needs no extra step."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    cfg = CheckpointConfig(output_dir=str(tmp_path / "run"), save_total_limit=None)
    with CheckpointManager(
        config=cfg, stateful_provider=SimpleStatefulProvider({}), model=model
    ) as m:
        path = m.save_checkpoint(checkpoint_id=1)
        m.wait()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(path)
    want = model.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in want.items())


def test_save_model_to_s3(s3_root: Any) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    cfg = CheckpointConfig(
        output_dir=s3_root.url, save_total_limit=None, storage_options=s3_root.storage_options
    )
    with CheckpointManager(
        config=cfg, stateful_provider=SimpleStatefulProvider({}), model=model
    ) as m:
        m.save_model()
    fs = s3_root.fs()
    doc = json.loads(fs.cat_file(s3_root.url.removeprefix("s3://") + "/config.json"))
    assert doc["vocab_size"] == 64
    assert fs.exists(s3_root.url.removeprefix("s3://") + "/model.safetensors.index.json")


# ---- dataloader position -------------------------------------------------------------------


def test_stateful_dataloader_position_resumes(tmp_path: Path) -> None:
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    data = torch.arange(200)

    def loader(seed: int) -> Any:
        return sdl.StatefulDataLoader(
            data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )

    t = Trainer(0)
    dl = loader(0)
    t.provider = SimpleStatefulProvider({**t.statefuls, "data": dl})
    it = iter(dl)
    for _ in range(5):
        next(it)
    with t.manager(str(tmp_path)) as m:
        m.save_checkpoint(checkpoint_id=5)
    expected = [next(it).tolist() for _ in range(3)]
    fresh = Trainer(1)
    dl2 = loader(99)
    fresh.provider = SimpleStatefulProvider({**fresh.statefuls, "data": dl2})
    with fresh.manager(str(tmp_path)) as m2:
        m2.load_checkpoint()
    it2 = iter(dl2)
    assert [next(it2).tolist() for _ in range(3)] == expected


def test_named_states_warn_for_missing_and_fail_for_broken(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = Counter("a"), Counter("b")
    NamedStates({"a": a, "b": b}).load_state_dict({"a": {"value": 2}, "gone": {}})
    assert a.value == 2 and "'b'" in caplog.text
    with pytest.raises(StateMismatchError, match="'a'"):
        NamedStates({"a": a}).load_state_dict({"a": {}})


def test_provider_model_component_lends_its_pattern(tmp_path: Path) -> None:
    t = Trainer(0)

    class Provider:
        def get_state_components(self) -> list[StateComponent]:
            return [
                StateComponent("model", t.model, SharingPattern.REPLICATED),
                StateComponent("optimizer", t.opt, SharingPattern.GLOBAL),
            ]

        def get_process_groups(self) -> dict[str, Any]:
            return {}

    cfg = CheckpointConfig(output_dir=str(tmp_path), save_total_limit=None)
    with CheckpointManager(config=cfg, stateful_provider=Provider(), model=t.model) as m:
        path = m.save_checkpoint(checkpoint_id=1)
    manifest = json.loads(Path(path, MANIFEST_NAME).read_text())
    assert manifest["components"]["model"]["sharing_pattern"] == "replicated"
    assert Path(path, "model.safetensors").exists()  # one shard: no index, as HF writes it


# ---- tiering -------------------------------------------------------------------------------


@pytest.mark.parametrize("storage_root", ["local", "s3"], indirect=True)
def test_tiering_saves_locally_replicates_and_resumes_from_either_tier(
    tmp_path: Path, storage_root: Any
) -> None:
    local = str(tmp_path / "fast")
    remote, ropts = storage_root.url, storage_root.storage_options
    tiering = TieringConfig(remote_root=remote, storage_options=ropts, keep_local=1)

    def manager(t: Trainer) -> CheckpointManager:
        cfg = CheckpointConfig(output_dir=local, save_total_limit=2, tiering=tiering)
        return CheckpointManager(config=cfg, stateful_provider=t.provider, model=t.model)

    t = Trainer(0)
    with manager(t) as m:
        for step in range(1, 5):
            t.step()
            path = next_checkpoint_path(local, step)
            m.update_best_checkpoints(path, {"loss": 1.0 if step == 1 else 2.0}, "loss", None, 1)
            assert m.save_checkpoint(checkpoint_id=step) == path
    assert _complete(remote, **ropts) == ["checkpoint-1", "checkpoint-4"]  # best + newest
    assert _complete(local) == ["checkpoint-4"]  # keep_local=1, the rest replicated first
    fresh = Trainer(1)
    with manager(fresh) as m2:
        assert m2.load_checkpoint() == next_checkpoint_path(local, 4)  # local copy first
        assert fresh.progress.global_step == 4
        assert m2.best_checkpoints == [(next_checkpoint_path(local, 1), 1.0)]  # remote copy
        # a checkpoint pruned locally loads from the remote tier
        assert m2.load_checkpoint(next_checkpoint_path(local, 1)).startswith(remote)
        assert fresh.progress.global_step == 1
    import shutil

    shutil.rmtree(local)
    again = Trainer(2)
    with manager(again) as m3:
        assert m3.load_checkpoint().startswith(remote)  # the local tier is gone
    assert again.progress.global_step == 4


def test_tiering_replicates_what_a_crash_left_local_only(tmp_path: Path) -> None:
    local, remote = str(tmp_path / "fast"), str(tmp_path / "slow")
    t = Trainer(0)
    with t.manager(local) as m:  # no tiering: a run that died before replicating
        m.save_checkpoint(checkpoint_id=7)
    cfg = CheckpointConfig(
        output_dir=local, save_total_limit=None, tiering={"remote_root": remote, "keep_local": 3}
    )
    with CheckpointManager(config=cfg, stateful_provider=t.provider, model=t.model) as m2:
        m2.start()
    assert _complete(remote) == ["checkpoint-7"]
    assert verify_checkpoint(next_checkpoint_path(remote, 7), deep=True).ok


@pytest.mark.gpu
def test_cuda_state_round_trip_keeps_devices(tmp_path: Path) -> None:
    def build(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = TinyMLP(seed=seed).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model(torch.randn(4, 16, device="cuda")).pow(2).mean().backward()
        opt.step()
        return model, opt

    model, opt = build(0)
    cfg = CheckpointConfig(output_dir=str(tmp_path), save_total_limit=None)
    provider = SimpleStatefulProvider({"optimizer": opt, "rng": RNGState()})
    with CheckpointManager(config=cfg, stateful_provider=provider, model=model) as m:
        m.save_checkpoint(checkpoint_id=1)
    cuda_rng = torch.cuda.get_rng_state_all()
    torch.cuda.manual_seed_all(123)
    fresh, opt2 = build(1)
    provider2 = SimpleStatefulProvider({"optimizer": opt2, "rng": RNGState()})
    with CheckpointManager(config=cfg, stateful_provider=provider2, model=fresh) as m2:
        m2.load_checkpoint()
    for k, v in model.state_dict().items():
        got = fresh.state_dict()[k]
        assert got.device == v.device and torch.equal(got, v), k
    for pid, st in opt.state_dict()["state"].items():
        assert torch.equal(opt2.state_dict()["state"][pid]["exp_avg"], st["exp_avg"])
        assert opt2.state_dict()["state"][pid]["exp_avg"].is_cuda
    assert all(
        torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda_rng, strict=True)
    )
