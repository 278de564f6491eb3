"""Quality scoring: fastText classifiers trained on real reference-vs-web text, applied on Ray, and
selection by threshold, global per-source percentile or Pareto sampling. See docs/pipeline.md."""
