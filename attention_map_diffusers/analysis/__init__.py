"""Analysis (numpy and matplotlib, never torch): reading dumps, words, statistics, tables, plots, report."""
