"""Start Training: jobs per project, the child process that fine-tunes, measures and activates, and a project's annotated tasks as training data."""
