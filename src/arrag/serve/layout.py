"""The Gradio page of ``arrag serve``: the settings on top, then four labelled columns (the model alone, with
retrieval, the provenance map of one retrieval image, the database patch a clicked cell's token came from).

Handlers are thin calls into :mod:`arrag.serve.requests`; a session's result lives in its own ``gr.State``.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import gradio as gr

from arrag.config import METHODS, Duplicates, RetrievalConfig
from arrag.extras import MissingDependencyError
from arrag.serve.provenance import display_scale, enlarge
from arrag.serve.requests import (
    MAX_IMAGES,
    METHOD_LABELS,
    DatabaseChoice,
    Library,
    Picture,
    Request,
    Result,
    error_message,
    prefilled_retrieval,
    provenance_map,
    run,
    save_result,
    select_patch,
)

EXAMPLE_PROMPT = "a red 7 and a white 8"
HINT = "click a cell of the map to see where its token came from"
EXPECTED_ERRORS = (ValueError, FileNotFoundError, FileExistsError, MissingDependencyError)  # the CLI's one-liners
CSS = """
#message textarea { font-family: ui-monospace, monospace; }
.column-title h3 { margin: 0 0 4px 0; }
"""
GALLERY = {"columns": 2, "object_fit": "contain", "allow_preview": False}
THUMBNAIL_ROW_PX = 170  # a row of two thumbnails in a column
INTRO = (
    "## arrag — retrieval at work\n"
    "Each prompt is drawn twice with the same seeds: by the model alone and with retrieval. The provenance map "
    "tints every token cell of a retrieval image by how much of its token's probability came from retrieval "
    "(dark: the model, yellow: retrieval, grey: no search there). Click a cell to see the database patch its "
    "token came from."
)


def retrieval_fields(config: RetrievalConfig) -> tuple[float, float, int, Duplicates]:
    return config.weight, config.temperature, config.k, config.duplicates


def gallery(pictures: Sequence[Picture]) -> dict:
    """A gallery's items, each image enlarged as the map shows it (sharp token cells) with its caption, and a
    height that shows them all."""
    items = [(enlarge(p.image, display_scale(p.image.shape[1])), p.caption) for p in pictures]
    rows = -(-len(items) // GALLERY["columns"])
    return gr.update(value=items, height=24 + THUMBNAIL_ROW_PX * min(rows, 4))


def build_app(
    library: Library,
    databases: Sequence[DatabaseChoice],
    backend: str,
    wording: Callable[[str], str] = str,
    downloads: Path | None = None,
) -> gr.Blocks:
    """The page, serving ``library``'s backends over ``databases``; ``backend`` is preselected, ``wording``
    words error messages (the CLI's flags), ``downloads`` holds each request's files (default: a temporary
    folder, removed at exit)."""
    if downloads is None:
        downloads = Path(tempfile.mkdtemp(prefix="arrag-serve-"))
        atexit.register(shutil.rmtree, downloads, ignore_errors=True)
    backends = list(dict.fromkeys([backend, "builtin", "tiny", *(choice.backend for choice in databases)]))
    first = str(databases[0].path) if databases else None
    prefill, note = prefilled_retrieval(first)

    with gr.Blocks(title="arrag serve", analytics_enabled=False, fill_width=True) as app:
        state = gr.State(None)  # this session's Result
        gr.Markdown(INTRO)
        with gr.Row(equal_height=True):
            prompts = gr.Textbox(EXAMPLE_PROMPT, label="Prompts (one per line)", lines=2, scale=3, elem_id="prompts")
            backend_box = gr.Dropdown(backends, value=backend, label="Backend", elem_id="backend")
            database = gr.Dropdown(
                [(choice.label, str(choice.path)) for choice in databases],
                value=first,
                label="Patch database",
                scale=2,
                elem_id="database",
            )
            method = gr.Radio(
                [(METHOD_LABELS[m], m) for m in METHODS], value="daid", label="Method", scale=2, elem_id="method"
            )
        with gr.Row(equal_height=True):
            weight = gr.Number(prefill.weight, label="λ (weight)", step=0.05, elem_id="weight")
            tau = gr.Number(prefill.temperature, label="τ (temperature)", step=0.1, elem_id="tau")
            k = gr.Number(prefill.k, label="k (neighbours)", precision=0, elem_id="k")
            duplicates = gr.Radio(
                ["nearest", "sum"], value=prefill.duplicates, label="duplicate tokens", elem_id="duplicates"
            )
            seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
            images = gr.Number(2, label=f"images per prompt (1–{MAX_IMAGES})", precision=0, elem_id="images")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
        calibration = gr.Markdown(note, elem_id="calibration")
        message = gr.Textbox(label="Status", interactive=False, elem_id="message")
        with gr.Row(equal_height=False):
            with gr.Column(min_width=240):
                gr.Markdown("### Model alone", elem_classes="column-title")
                base = gr.Gallery(label="same seeds", height=24 + THUMBNAIL_ROW_PX, **GALLERY, elem_id="base")
            with gr.Column(min_width=240):
                gr.Markdown("### With retrieval", elem_classes="column-title")
                shown = gr.Gallery(label="same seeds", height=24 + THUMBNAIL_ROW_PX, **GALLERY, elem_id="retrieval")
            with gr.Column(min_width=240):
                gr.Markdown("### Provenance map", elem_classes="column-title")
                row = gr.Radio([], label="retrieval image", elem_id="row")
                chart = gr.Image(
                    label="retrieval share per patch: click a cell", interactive=False, elem_id="provenance"
                )
            with gr.Column(min_width=240):
                gr.Markdown("### Source patch", elem_classes="column-title")
                source = gr.Image(label="database image, source patch outlined", interactive=False, elem_id="source")
                patch = gr.Markdown(elem_id="patch")
        files = gr.File(label="Download: PNGs, JSON sidecars, provenance pictures", file_count="multiple")

        cleared = {
            state: None,
            base: gallery([]),
            shown: gallery([]),
            row: gr.update(choices=[], value=None),
            chart: None,
            source: None,
            patch: "",
            files: None,
            message: "",
        }

        def failed(error: Exception) -> dict:
            return {message: f"error: {error_message(error, wording)}"}

        def generate(*fields: object, progress: gr.Progress = gr.Progress()) -> dict:  # noqa: B008 (Gradio's idiom)
            start = time.perf_counter()
            try:
                request = Request.from_form(*fields)  # type: ignore[arg-type]
                result = run(library, request, lambda fraction, text: progress(fraction, desc=text))
                written = save_result(library, result, downloads / uuid.uuid4().hex)
            except EXPECTED_ERRORS as error:
                return {**cleared, **failed(error)}
            count = len(result.base.pictures)
            done = f"{count} image{'s' * (count != 1)} per column in {time.perf_counter() - start:.1f} s"
            page = {**cleared, state: result, base: gallery(result.base.pictures), files: list(map(str, written))}
            if result.retrieval is None:
                return {**page, patch: "method none: nothing was retrieved", message: done}
            choices = [(f"image {i + 1}", i) for i in range(count)]
            return {
                **page,
                shown: gallery(result.retrieval.pictures),
                row: gr.update(choices=choices, value=0),
                chart: provenance_map(result, 0),
                patch: HINT,
                message: done,
            }

        def show_row(result: Result | None, chosen: int | None) -> dict:
            if result is None or result.retrieval is None or chosen is None:
                return {chart: None, source: None, patch: ""}
            try:
                return {chart: provenance_map(result, int(chosen)), source: None, patch: HINT}
            except EXPECTED_ERRORS as error:
                return failed(error)

        def pick_row(evt: gr.SelectData) -> int:
            return int(evt.index)

        def select(result: Result | None, chosen: int | None, evt: gr.SelectData) -> dict:
            if result is None or result.retrieval is None or chosen is None:
                return {patch: "generate with retrieval first"}
            try:
                view = select_patch(library, result, int(chosen), *map(float, evt.index))
            except EXPECTED_ERRORS as error:
                return failed(error)
            return {chart: view.map, source: view.source, patch: view.text}

        def choose_database(directory: str | None) -> dict:
            config, line = prefilled_retrieval(directory)
            chosen = next((choice for choice in databases if str(choice.path) == directory), None)
            values = dict(zip((weight, tau, k, duplicates), retrieval_fields(config), strict=True))
            return {**values, calibration: line, **({backend_box: chosen.backend} if chosen else {})}

        fields = [prompts, backend_box, database, method, weight, tau, k, duplicates, seed, images]
        shows = {chart, source, patch, message}
        button.click(generate, fields, set(cleared), concurrency_id="generate")
        row.input(show_row, [state, row], shows)
        shown.select(pick_row, None, row).then(show_row, [state, row], shows)
        chart.select(select, [state, row], shows)
        database.input(choose_database, database, {backend_box, weight, tau, k, duplicates, calibration})
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> None:
    """Serve ``app`` on ``host``:``port``, one generation at a time (others wait in the queue, seeing their
    place); ``block`` False returns once the server is up."""
    app.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        quiet=True,
        ssr_mode=False,
        footer_links=[],
        css=CSS,
    )
