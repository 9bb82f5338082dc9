import numpy as np
import pytest

from clbench import metrics

# Accuracy after training task i (row) on task j (column), computed by hand below.
R = np.array([
    [0.9, 0.1, 0.2],
    [0.6, 0.8, 0.3],
    [0.5, 0.7, 0.95],
])
INIT = np.array([0.1, 0.2, 0.25])


def test_average_accuracy():
    assert metrics.average_accuracy(R) == pytest.approx((0.5 + 0.7 + 0.95) / 3)


def test_forgetting_uses_best_previous_accuracy():
    # Task 1 peaks after task 2, not when it was learned: max(0.6, 0.9, 0.8) - 0.5 = 0.4 (not
    # 0.6 - 0.5). Task 2 ends above its best before the last step: max(0.7, 0.5) - 0.9 = -0.2
    # (the last step is not a previous one). Task 3: 0.6 - 0.4 = 0.2; the last task undefined.
    accuracies = np.array([
        [0.6, 0.0, 0.0, 0.0],
        [0.9, 0.7, 0.0, 0.0],
        [0.8, 0.5, 0.6, 0.0],
        [0.5, 0.9, 0.4, 0.8],
    ])
    np.testing.assert_allclose(metrics.forgetting_per_task(accuracies)[:3], [0.4, -0.2, 0.2])
    assert np.isnan(metrics.forgetting_per_task(accuracies)[3])
    assert metrics.average_forgetting(accuracies) == pytest.approx(0.4 / 3)
    # The matrix above (best accuracy right after training): (0.4 + 0.1) / 2.
    assert metrics.average_forgetting(R) == pytest.approx(0.25)


def test_backward_transfer():
    # ((0.5 - 0.9) + (0.7 - 0.8)) / 2
    assert metrics.backward_transfer(R) == pytest.approx(-0.25)


def test_forward_transfer_against_untrained_model():
    # ((R[0,1] - init[1]) + (R[1,2] - init[2])) / 2 = ((0.1 - 0.2) + (0.3 - 0.25)) / 2
    assert metrics.forward_transfer(R, INIT) == pytest.approx(-0.025)


def test_single_task_has_no_forgetting_or_transfer():
    one = np.array([[0.7]])
    assert np.isnan(metrics.average_forgetting(one))
    assert np.isnan(metrics.backward_transfer(one))
    assert np.isnan(metrics.forward_transfer(one, INIT[:1]))


def test_tidy_metrics_after_each_step():
    table = metrics.tidy_metrics(R, INIT, prefix="task_aware_")

    def aggregate(metric, step):
        return table[(table.metric == metric) & (table.step == step) & table.task.isna()].value.item()

    assert aggregate("task_aware_average_accuracy", 2) == pytest.approx(0.7)  # (0.6 + 0.8) / 2
    assert aggregate("task_aware_backward_transfer", 2) == pytest.approx(-0.3)  # 0.6 - 0.9
    assert aggregate("task_aware_average_forgetting", 3) == pytest.approx(0.25)
    untrained = table[(table.metric == "task_aware_accuracy") & (table.step == 0)]
    np.testing.assert_allclose(untrained.value, INIT)
    assert set(table.step) == {0, 1, 2, 3}
    assert not table.value.isna().any()
