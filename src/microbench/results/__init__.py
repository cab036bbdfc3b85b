"""Run records (metrics.json, predictions.parquet, results.md) and the leaderboard built from them."""
