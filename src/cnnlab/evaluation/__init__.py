"""Evaluation: test statistics (intervals, McNemar + Holm, the comparison table) and figures."""
