"""The same FedAnchorRecipe that runs in the simulator, run in production: FLARE's ProdEnv with the lead's admin
startup kit, on the provisioned mutual-TLS loopback federation (server + hospital-a/-b/-c on 127.0.0.1).

One test, about a minute on a 2-core CPU: provision and start the federation, run the recipe of jobs/hospitals-motion
(tiny trunk, 2 rounds) with ``recipe.run(ProdEnv(...))``, wait for the result through the returned Run, check it
completed with both rounds and every hospital in each; then `shutdown all`.
"""
from __future__ import annotations

import time

import pytest

from fedanchor.deploy import admin_api
from fedanchor.deploy.loopback import LoopbackDeployment
from fedanchor.flare.recipe import FedAnchorRecipe

pytestmark = pytest.mark.deployment

SITES = ["hospital-a", "hospital-b", "hospital-c"]


def test_the_recipe_runs_in_prodenv_on_the_loopback_deployment(tmp_path):
    from nvflare.recipe.prod_env import ProdEnv

    recipe = FedAnchorRecipe.from_demo("hospitals-motion")
    assert recipe.sites == SITES and recipe.num_rounds == 2
    started = time.monotonic()
    with LoopbackDeployment(tmp_path / "loopback", echo=print) as deployment:
        deployment.provision()
        if hasattr(deployment, "approve"):  # sites that admit only jobs their admin approved: approve this export
            deployment.approve(recipe.export_folder(tmp_path / "approved" / "hospitals-motion"))
        deployment.start(timeout=180)
        user, kit = deployment.kits.admin("lead")
        env = ProdEnv(startup_kit_location=str(kit), username=user, login_timeout=30.0)
        run = recipe.run(env)
        result = run.get_result(timeout=400)  # watches the job, then downloads it to <kit>/transfer/<job id>
        status = run.get_status()
        print(f"job {run.get_job_id()} {status} in {time.monotonic() - started:.0f}s from provisioning")
        assert status == admin_api.COMPLETED, (status, deployment.workdir)
        summary = admin_api.read_result(result).summary
        assert [r["round"] for r in summary["rounds"]] == [0, 1]
        for record in summary["rounds"]:
            assert record["accepted"] == SITES and record["rejected"] == {}, record
        assert summary["config"]["rounds"] == 2 and "accel->gyro/recall@1" in summary["final_eval"]
        assert deployment.shutdown(timeout=90) == []
    assert not deployment.alive()
