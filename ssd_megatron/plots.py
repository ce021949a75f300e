"""matplotlib's pyplot on the file-only Agg backend: every figure here is written to a file, on machines with no
display (CI, GPU nodes)."""


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
