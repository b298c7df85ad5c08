"""Algorithm plug-ins: data, model set-up and loss of each algorithm; the loops live in engine/."""
