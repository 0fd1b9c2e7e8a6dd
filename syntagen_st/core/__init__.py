"""The foundation every stage stands on: config, errors, classes, files, the run folder's layout, seeds, rules."""
