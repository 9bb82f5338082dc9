"""Datasets and scenarios: `scenarios` defines the benchmarks (datasets split into tasks),
`loaders` reads each dataset from a data root, `images` decodes and caches image files."""
