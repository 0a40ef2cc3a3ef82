"""Reports of runs: tables, plots, Markdown and HTML, and each kind's section."""
