"""The verify_large job: a process per combination within host memory (job), the combinations and limits
(plan), one run in its own process (worker), the text (report)."""
