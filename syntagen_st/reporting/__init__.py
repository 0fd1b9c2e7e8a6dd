"""The run report: facts read from a run folder, figures, HTML sections."""
