"""Run infrastructure: assets, model loading, checkpoint reading, export, reports and pictures, command-line tools."""
