"""The method registry, and Ditto's and SCAFFOLD's update rules against hand-computed values.

The rules are checked on a stand-in site (a linear model, plain SGD, a real ignite engine as the
trainer) so that each number can be written down by hand; the methods' use of a real bundle site
runs in the simulator tests.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from fedharmony.bundle.optim import RoundSchedule
from fedharmony.methods import METHODS, make_site_method, recipe_class, site_method_class
from fedharmony.methods.scaffold.site import C_DIFF, C_GLOBAL, control_update, corrected_step

PACKAGE = Path(__file__).resolve().parents[1] / "custom" / "fedharmony"


class StandInSite:
    """The parts of :class:`fedharmony.bundle.site.BundleSite` a method uses, around ``y = w x`` (no bias),
    squared error, plain SGD on fixed batches. ``run_epochs`` runs a real ignite engine (one
    iteration per batch), so iteration handlers fire as in a MONAI trainer."""

    def __init__(self, batches, lr=0.1):
        self.site_name = "stand-in"
        self.network = torch.nn.Linear(1, 1, bias=False)
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=lr)
        self.round_schedule = RoundSchedule(lr)  # the bundle default: a constant rate
        self.base_loss = torch.nn.MSELoss(reduction="sum")
        self.batches = batches
        self.loss = self.base_loss
        self.round = 0
        self.recorded = []

        def step(engine, batch):
            x, y = batch
            self.optimizer.zero_grad()
            loss = self.loss(self.network(x), y)
            loss.backward()
            self.optimizer.step()
            return loss.item()

        self.trainer = Engine(step)

    # weights
    def state_dict(self):
        return {k: v.detach().clone() for k, v in self.network.state_dict().items()}

    def shared_weights(self):
        return self.state_dict()

    def load_weights(self, weights, keep_local=True, network=None):
        (network or self.network).load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})

    # training
    def run_epochs(self, epochs, loss=None):
        self.loss = loss if loss is not None else self.base_loss
        state = self.trainer.run(self.batches, max_epochs=epochs)
        self.loss = self.base_loss
        return state.iteration

    def evaluate(self, weights=None, split="validation"):
        return {"score": -float(weights["weight"].sum()) if weights is not None else 0.0}

    def record_metric(self, metric, weights=None):
        self.recorded.append((metric, weights))


def _w(value):
    return {"weight": torch.tensor([[float(value)]])}


# ---------------------------------------------------------------------------------------------- registry
def test_the_registry_knows_every_method_and_refuses_what_it_does_not():
    assert set(METHODS) >= {"fedavg", "fedprox", "fedbn", "harmofl", "iopfl", "prrfl", "ditto", "scaffold"}
    for name in METHODS:
        assert site_method_class(name).name == name
        assert recipe_class(name).method == name
    with pytest.raises(ValueError, match="unknown method 'os'"):
        make_site_method("os")
    with pytest.raises(ValueError, match="unknown method"):
        make_site_method("fedavg.site")  # a name, not a path: nothing outside the registry is importable
    with pytest.raises(ValueError, match=r"method 'fedprox': \['alpha'\] is not a site setting of fedprox; "
                                         r"its site settings: \['mu'\]"):
        make_site_method("fedprox", {"alpha": 0.1})
    with pytest.raises(ValueError, match=r"\['prrfl_r0'\] is not a site setting"):  # a server-side setting
        make_site_method("prrfl", {"prrfl_r0": 0.5})
    with pytest.raises(ValueError, match="setting 'mu' must be a plain"):
        make_site_method("fedprox", {"mu": {"_target_": "os.system"}})
    with pytest.raises(ValueError, match="mu must be > 0, got -1.0"):
        make_site_method("fedprox", {"mu": -1.0})
    with pytest.raises(ValueError, match="ditto_lambda must be a finite number, got nan"):
        make_site_method("ditto", {"ditto_lambda": float("nan")})
    with pytest.raises(ValueError, match=r"iop_alpha must be in \[0, 1\), got 1.0"):
        make_site_method("iopfl", {"iop_alpha": 1.0})


def test_a_recipe_refuses_another_methods_setting_naming_it():
    from fedharmony.fl.job import FedHarmonyRecipe

    bundle = str(PACKAGE.parents[1] / "bundles" / "prostate_mri_seg")
    with pytest.raises(ValueError, match=r"\['amp_ratio'\] is not a setting of fedavg \('amp_ratio' is harmofl's\)"):
        FedHarmonyRecipe("fedavg", bundle_dir=bundle, amp_ratio=0.1)
    with pytest.raises(ValueError, match=r"'mu'.*of ditto.*own settings: \['ditto_lambda', 'ditto_epochs'\]"):
        FedHarmonyRecipe("ditto", bundle_dir=bundle, mu=0.1)
    with pytest.raises(ValueError, match=r"\['num_round'\] is not a setting of fedavg \('num_round' is no setting "
                                         r"of any method\).*every method's: \[.*'num_rounds'"):
        FedHarmonyRecipe("fedavg", bundle_dir=bundle, num_round=3)
    with pytest.raises(TypeError):  # the recipes take keyword arguments only
        recipe_class("fedprox")(bundle, 3)


@pytest.mark.parametrize("module", ["bundle/site.py", "fl/executor.py", "fl/recipe.py"])
def test_the_site_runner_executor_and_common_recipe_name_no_method(module):
    from method_coupling import code_names  # tools/ is on sys.path (conftest): one definition of "code"

    names = list(code_names((PACKAGE / module).read_text()))
    mentioned = sorted({m for m in METHODS if m != "fedavg" for n in names if m in n})
    assert mentioned == [], f"{module} names methods in its code: {mentioned}"


# ---------------------------------------------------------------------------------------------- SCAFFOLD
def test_scaffold_correction_and_control_update_by_hand():
    w = {"w": torch.tensor([1.0, 2.0])}
    corrected_step(w, {"w": torch.tensor([0.5, 0.0])}, {"w": torch.tensor([0.0, 1.0])}, lr=0.1)
    torch.testing.assert_close(w["w"], torch.tensor([1.0 - 0.05, 2.0 + 0.1]))  # w - lr (c - c_k)

    c_local, c_global = {"w": torch.tensor([0.2])}, {"w": torch.tensor([0.5])}
    new, delta = control_update(c_local, c_global, {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.4])},
                                steps=3, lr=0.1)
    # c_k+ = 0.2 - 0.5 + (1.0 - 0.4) / (3 * 0.1) = 1.7;  delta = 1.7 - 0.2 = 1.5
    torch.testing.assert_close(new["w"], torch.tensor([1.7]))
    torch.testing.assert_close(delta["w"], torch.tensor([1.5]))
    with pytest.raises(ValueError, match="at least one step"):
        control_update(c_local, c_global, c_local, c_local, steps=0, lr=0.1)


def test_scaffold_site_round_by_hand_and_equal_to_nvflares_helper():
    """Two SGD steps on y = w x from w = 1 with c = 0.5, c_k = 0.1, lr = 0.1, written out by hand,
    and the same round through NVFlare's PTScaffoldHelper."""
    from nvflare.app_opt.pt.scaffold import PTScaffoldHelper

    x1, y1, x2, y2 = 1.0, 3.0, 2.0, 2.0
    batches = [(torch.tensor([[x1]]), torch.tensor([[y1]])), (torch.tensor([[x2]]), torch.tensor([[y2]]))]
    lr, c, ck = 0.1, 0.5, 0.1
    site = StandInSite(batches, lr)
    method = make_site_method("scaffold")
    method.attach(site)
    method.load_state_dict({"c_local": {"weight": torch.tensor([[ck]])}})
    method.receive(_w(1.0), {C_GLOBAL: {"weight": np.array([[c]], dtype=np.float32)}})
    method.before_training()
    site.run_epochs(1)
    method.after_training()
    sent, meta = method.outgoing()

    w = 1.0  # by hand: SGD on (w x - y)^2, then w -= lr (c - c_k)
    for x, y in ((x1, y1), (x2, y2)):
        w = w - lr * 2 * x * (w * x - y)
        w = w - lr * (c - ck)
    c_new = ck - c + (1.0 - w) / (2 * lr)
    assert sent["weight"].item() == pytest.approx(w, rel=1e-5)
    assert meta[C_DIFF]["weight"].item() == pytest.approx(c_new - ck, rel=1e-5)
    assert method.c_local["weight"].item() == pytest.approx(c_new, rel=1e-5)

    net = torch.nn.Linear(1, 1, bias=False)  # NVFlare's helper on the same round
    net.weight.data.fill_(1.0)
    helper = PTScaffoldHelper()
    helper.init(net)
    helper.load_global_controls({"weight": torch.tensor([[c]])})
    helper.c_local.load_state_dict({"weight": torch.tensor([[ck]])})
    c_global_para, c_local_para = helper.get_params()
    global_model = torch.nn.Linear(1, 1, bias=False)
    global_model.weight.data.fill_(1.0)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for xb, yb in batches:
        opt.zero_grad()
        torch.nn.MSELoss(reduction="sum")(net(xb), yb).backward()
        opt.step()
        helper.model_update(net, lr, c_global_para, c_local_para)
    helper.terms_update(net, lr, c_global_para, c_local_para, global_model)
    assert net.weight.item() == pytest.approx(sent["weight"].item(), rel=1e-6)
    np.testing.assert_allclose(helper.get_delta_controls()["weight"], meta[C_DIFF]["weight"], rtol=1e-6)


def test_scaffold_server_moves_its_control_by_the_mean_change_and_rejects_bad_ones():
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    from fedharmony.methods.scaffold.server import ScaffoldAggregator

    agg = ScaffoldAggregator()
    agg._expected = {"conv.weight": (2,), "bn.running_mean": (2,)}

    def update(site, w, diff):
        meta = {"client_name": site, "num_samples": 1}
        if diff is not None:
            meta[C_DIFF] = diff
        return FLModel(params={"conv.weight": np.full(2, w), "bn.running_mean": np.zeros(2)},
                       params_type=ParamsType.FULL, meta=meta)

    agg.accept_model(update("site-1", 1.0, {"conv.weight": np.array([1.0, -2.0])}))
    agg.accept_model(update("site-2", 3.0, {"conv.weight": np.array([3.0, 0.0])}))
    agg.accept_model(update("site-3", 9.0, None))  # no control change: rejected whole
    agg.accept_model(update("site-4", 9.0, {"conv.weight": np.array([np.nan, 0.0])}))
    agg.accept_model(update("site-5", 9.0, {"head.weight": np.ones(2)}))
    out = agg.aggregate_model()
    np.testing.assert_allclose(out.params["conv.weight"], 2.0)  # only sites 1 and 2 averaged
    np.testing.assert_allclose(out.meta[C_GLOBAL]["conv.weight"], [2.0, -1.0])  # 0 + mean change
    assert set(out.meta["rejected"]) == {"site-3", "site-4", "site-5"}
    assert "NaN" in out.meta["rejected"]["site-4"] and "does not have" in out.meta["rejected"]["site-5"]

    agg.reset_stats()  # the next round builds on the moved control
    agg.accept_model(update("site-1", 1.0, {"conv.weight": np.array([1.0, 1.0])}))
    np.testing.assert_allclose(agg.aggregate_model().meta[C_GLOBAL]["conv.weight"], [3.0, 0.0])


def test_the_server_checkpoint_leaves_array_meta_out_and_loads_with_weights_only(tmp_path):
    from fedharmony.fl.persistor import checkpoint_meta

    meta = {C_GLOBAL: {"w": np.zeros(2, dtype=np.float32)}, "current_round": 3, "rejected": {"site-1": "NaN"}}
    torch.save({"meta_props": meta}, tmp_path / "raw.pt")
    with pytest.raises(Exception, match="Weights only load failed"):  # why the control variate stays out
        torch.load(tmp_path / "raw.pt", weights_only=True)
    kept = checkpoint_meta(meta)
    assert kept == {"current_round": 3, "rejected": {"site-1": "NaN"}}
    torch.save({"meta_props": kept}, tmp_path / "kept.pt")
    assert torch.load(tmp_path / "kept.pt", weights_only=True)["meta_props"]["current_round"] == 3


# ---------------------------------------------------------------------------------------------- Ditto
def test_ditto_personalized_model_step_by_hand_and_the_global_model_untouched():
    """One batch, one epoch, lambda 0.5, lr 0.1: v <- v - lr (2 x (v x - y) + lambda (v - w_global))."""
    x, y, lam, lr = 2.0, 1.0, 0.5, 0.1
    site = StandInSite([(torch.tensor([[x]]), torch.tensor([[y]]))], lr)
    method = make_site_method("ditto", {"ditto_lambda": lam, "ditto_epochs": 1})
    method.attach(site)

    method.receive(_w(1.0), {})  # round 0: the first global model starts v
    assert method.personal["weight"].item() == 1.0
    site.run_epochs(1)  # FedAvg's local training of the global model
    trained_global = site.state_dict()
    notes = method.after_round("score")
    v = 1.0 - lr * (2 * x * (1.0 * x - y) + lam * (1.0 - 1.0))
    assert method.personal["weight"].item() == pytest.approx(v, rel=1e-6)
    assert torch.equal(site.state_dict()["weight"], trained_global["weight"])  # what FedAvg sends is unchanged
    assert "score_personalized" in notes.tracked and site.recorded[-1][1] is method.personal

    w_global = 0.3  # round 1: a new global model; v keeps its own value and is pulled towards w_global
    method.receive(_w(w_global), {})
    site.run_epochs(1)
    method.after_round("score")
    v2 = v - lr * (2 * x * (v * x - y) + lam * (v - w_global))
    assert method.personal["weight"].item() == pytest.approx(v2, rel=1e-5)

    restored = make_site_method("ditto", {"ditto_lambda": lam, "ditto_epochs": 1})  # a restarted site process
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.personal["weight"], method.personal["weight"])
    assert restored.personal_optimizer is not None


def test_ditto_with_a_huge_lambda_stays_at_the_global_model():
    site = StandInSite([(torch.tensor([[1.0]]), torch.tensor([[5.0]]))], lr=1e-4)
    method = make_site_method("ditto", {"ditto_lambda": 1e4, "ditto_epochs": 3})
    method.attach(site)
    method.receive(_w(2.0), {})
    method.personal = _w(2.5)
    method.after_round("score")
    # each step multiplies the distance to w_global by (1 - lr lambda) = 0 (the data term is tiny)
    assert math.isclose(method.personal["weight"].item(), 2.0, abs_tol=5e-3)


# ---------------------------------------------------------------------------------------------- layers
def _pure_modules():
    """Every module of the package except the NVFlare glue (``fl/``, ``methods/<name>/server.py``, the command)."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        if rel.parts[0] in ("fl", "__main__") or rel.parts[-1] == "server" or rel.parts[0] == "study":
            continue
        yield ".".join(("fedharmony", *(p for p in rel.parts if p != "__init__")))


def test_everything_below_the_nvflare_glue_imports_without_nvflare():
    import subprocess
    import sys

    modules = list(_pure_modules())
    assert "fedharmony.methods.prrfl.deputy" in modules and "fedharmony.bundle.site" in modules
    code = ("import importlib, sys\n"
            f"for m in {modules!r}:\n"
            "    importlib.import_module(m)\n"
            "    assert not any(k == 'nvflare' or k.startswith('nvflare.') for k in sys.modules), m\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
