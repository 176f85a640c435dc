"""matplotlib set-up shared by the tools: off-screen figures, PNG bytes (written atomically by the caller)."""
import io


def figure(width: float, height: float, dpi: int = 110, layout="constrained"):
    """A matplotlib Figure drawn by the Agg backend, whatever backend the user's matplotlibrc selects."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=dpi, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()
