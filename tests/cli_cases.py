"""Command-line cases shared by the CLI, results-folder and reliability tests (one tiny problem, so every file
reuses the same compiled solve): K=3, n=2, shallow width 4, linear, CE, free bias, 200 L-BFGS steps."""

TINY = [
    "-K",
    "3",
    "-n",
    "2",
    "--widths",
    "4",
    "--activation",
    "linear",
    "--loss",
    "ce",
    "--bias",
    "free",
    "--lam-H",
    "1e-3",
    "--lam-W",
    "2e-3",
    "--steps",
    "200",
]
