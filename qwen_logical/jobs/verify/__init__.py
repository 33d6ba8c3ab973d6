"""The verify job: every mesh x rule table in one process against the 1x1 logits (job), the suite that builds
and runs the combinations (suite), the verdict on their logits (verdict), the text (report)."""
