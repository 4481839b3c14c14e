"""RNA's mechanism on real data (spec rna.md §7): a short centralised run on digits-LT, fixed seed.

Trained with configs/rna-digits-lt.yaml (outliers: skimage photos; OOD test: noise, a source never seen in
training). Checks: mean ‖z‖ on ID test > on OOD test, RN AUROC clearly above 0.5, and the §7.4 ablation
(no outliers in the BN batch) leaves a smaller ID/OOD norm gap.
"""

from pathlib import Path

import pytest

import fedtrust

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "rna-digits-lt.yaml"
COMMON = ["rounds=15", "eval.every=15", "eval.ood=[noise]", "eval.scores=[rn,msp]", "seed=0"]


def final(tmp_path, name, *extra):
    result = fedtrust.run(CONFIG, COMMON + [f"out={tmp_path / name}", *extra], progress=False, report=False)
    return result.summary


def test_rna_amplifies_id_norms_and_the_ablation_shrinks_the_gap(tmp_path):
    rna = final(tmp_path, "rna")
    norms = rna["feature_norm"]
    assert norms["id"] > 1.3 * norms["noise"]  # measured: 10.8 vs 6.4
    assert rna["ood"]["noise/rn"]["auroc"] > 0.8

    ablation = final(tmp_path, "ablation", "objective.name=rna_no_outliers", "data.outliers=null")
    gap_rna = norms["id"] - norms["noise"]
    gap_ablation = ablation["feature_norm"]["id"] - ablation["feature_norm"]["noise"]
    assert gap_ablation < gap_rna
    assert ablation["ood"]["noise/rn"]["auroc"] < rna["ood"]["noise/rn"]["auroc"]
