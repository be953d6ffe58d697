"""The demo's verdict column: which way is better for each row of its table."""

from layerflow_jax import demo


def test_trained_is_better_follows_each_metrics_direction():
  assert demo.trained_is_better(0.10, 0.30, True)  # IoU: higher
  assert not demo.trained_is_better(0.125, 0.125, True)  # a tie is not a win
  assert demo.trained_is_better(0.48, 0.24, False)  # MAE: lower
  assert not demo.trained_is_better(0.24, 0.48, False)
  # a ratio to ground truth: closer to 1 on a log scale, from either side
  assert demo.trained_is_better(10.4, 2.0, None)
  assert demo.trained_is_better(0.2, 1.5, None)
  assert not demo.trained_is_better(1.1, 0.5, None)


def test_table_aligns_any_number_of_columns():
  text = demo._table(
    [("metric", "untrained", "trained", "trained better"), ("alpha IoU", "0.1", "0.3", "yes")]
  )
  lines = text.splitlines()
  assert len({len(line) for line in lines}) == 1
  assert lines[1].count(":") == 3
