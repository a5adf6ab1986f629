"""The page of ``cleardit serve`` (Gradio Blocks): controls on the left, the image (or CLEAR and full
attention side by side) with its timing and FLOPs on the right, this session's gallery below.

Every Generate press is one event of Gradio's queue with a concurrency limit of 1: one generation
at a time, the others wait and see their position. The work itself is ``request.run_request``.
"""

# no `from __future__ import annotations`: gradio reads the handlers' annotations (gr.SelectData)
import html
import os
import sys
import traceback
from pathlib import Path

from ..eval.prompts import load_prompts
from .model import LoadedModel
from .request import USER_ERRORS, PageRequest, attention_name, page_message, run_request

# the frontend's default theme fetches its fonts from the web; a local page must not depend on that
LOCAL_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
LOCAL_MONO_FONTS = ("ui-monospace", "monospace")
IMAGE_HEIGHT, GALLERY_HEIGHT = 360, 200  # px on the page; the PNGs keep their own size
CSS = (
    # small images (the mini model's 128 px) fill their box, with sharp pixels
    "#image-main img, #image-full img "
    "{ width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }\n"
    ".cleardit-error { color: #b91c1c; font-weight: 600; }"
)


def gradio():
    """The gradio module, or an ImportError that says how to install it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local server
    try:
        import gradio as gr
    except ImportError as exc:
        raise ImportError(
            "cleardit serve needs gradio: pip install 'cleardit[ui]' (make demo and make test install it)"
        ) from exc
    return gr


def theme():
    return gradio().themes.Default(font=list(LOCAL_FONTS), font_mono=list(LOCAL_MONO_FONTS))


def size_presets(model: LoadedModel) -> list[tuple[str, str]]:
    """(label, "WIDTHxHEIGHT") choices: the base size, 2x and 4x per side, and 2x wide or tall."""
    h, w = model.base_height, model.base_width
    sizes = [(w, h), (2 * w, 2 * h), (4 * w, 4 * h), (2 * w, h), (w, 2 * h)]
    return [(f"{sw} x {sh}" + (" (base)" if (sw, sh) == (w, h) else ""), f"{sw}x{sh}") for sw, sh in sizes]


def _pick_size(choice: str | None):
    gr = gradio()
    if not choice:
        return gr.update(), gr.update()
    width, height = (int(v) for v in choice.split("x"))
    return width, height


def error_html(message: str) -> str:
    """The message box's content for a request that was not generated."""
    return f'<p class="cleardit-error">Not generated: {html.escape(message)}</p>'


def build_page(model: LoadedModel, output: str | os.PathLike):
    """The Gradio Blocks of the page; each generation writes its PNGs into ``output``."""
    gr = gradio()
    output = Path(output)
    factor = model.size_factor

    def generate_on_page(
        prompt, width, height, radius, steps, seed, highres, strength, weights, compare, history,
        progress=gr.Progress(),  # noqa: B008 (gradio's way to ask for a progress bar)
    ):  # fmt: skip
        request = PageRequest(
            prompt=prompt, width=width, height=height, radius=radius, steps=steps, seed=seed,
            highres=highres, strength=strength, clear_weights=weights, compare=compare,
        )  # fmt: skip
        progress(0, desc="starting")

        def on_step(done: int, total: int) -> None:
            progress((done, total), desc="denoising", unit="steps")

        try:
            result = run_request(model, request, output, on_step)
        except USER_ERRORS as exc:
            message = page_message(str(exc))
        except Exception as exc:  # a fault of the server: logged in full, the page gets one line
            traceback.print_exc()
            message = (
                f"generation failed ({type(exc).__name__}: {exc}); the server keeps serving, see its log"
            )
        else:
            print(f"cleardit serve: {result.summary}", flush=True)
            history = result.entries + history
            return (
                "",
                gr.update(value=str(result.image), label=attention_name(result.entries[-1].parameters)),
                gr.update(value=str(result.full_image) if result.full_image else None, visible=compare),
                result.stats,
                [(str(e.path), e.caption) for e in history],
                [str(e.path) for e in history],
                history,
            )
        # the message next to the button; the last result and the gallery stay as they were
        return (error_html(message), *[gr.skip()] * 6)

    def show_parameters(history, evt: gr.SelectData):
        return history[evt.index].parameters if 0 <= evt.index < len(history) else None

    with gr.Blocks(title="cleardit: CLEAR attention", analytics_enabled=False) as page:
        gr.Markdown(
            f"## cleardit: CLEAR attention\n"
            f"**{model.name}** on {model.device}: sizes in multiples of {factor} px, trained at "
            f"{model.base_width} x {model.base_height}. CLEAR lets each image token attend only to the image "
            "tokens within a radius (plus all text); radius 0 is the model's own full attention."
        )
        history = gr.State([])
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                gr.Examples(
                    examples=[[p] for p in load_prompts()],
                    inputs=[prompt],
                    label="Example prompts (written for the shipped mini model)",
                    examples_per_page=4,
                )
                preset = gr.Radio(size_presets(model), label="Size presets", elem_id="size-preset")
                with gr.Row():
                    number = dict(min_width=80)
                    width = gr.Number(model.base_width, label=f"Width (x{factor})", elem_id="width", **number)
                    height = gr.Number(
                        model.base_height, label=f"Height (x{factor})", elem_id="height", **number
                    )
                    radius = gr.Number(
                        model.default_radius, label="Radius (0: full)", elem_id="radius", **number
                    )
                    steps = gr.Number(model.default_steps, label="Steps", elem_id="steps", **number)
                    seed = gr.Number(0, label="Seed", elem_id="seed", **number)
                with gr.Row():
                    highres = gr.Checkbox(
                        label="High resolution in two stages (--highres)", elem_id="highres"
                    )
                    strength = gr.Slider(
                        0.05, 1.0, value=0.3, step=0.05, label="Strength (stage 2 noise level)"
                    )
                with gr.Row():
                    weights = gr.Textbox(
                        str(model.default_weights or ""),
                        label="CLEAR weights file (.safetensors; empty = training-free)",
                        elem_id="weights",
                        scale=3,
                    )
                    upload = gr.UploadButton("Upload", file_types=[".safetensors"], size="sm", scale=1)
                compare = gr.Checkbox(label="Compare with full attention (same seed)", elem_id="compare")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                message = gr.HTML(elem_id="message")
            with gr.Column(scale=3):
                with gr.Row():
                    shown = dict(type="filepath", format="png", interactive=False, height=IMAGE_HEIGHT)
                    image = gr.Image(label="Image", elem_id="image-main", **shown)
                    full_image = gr.Image(
                        label="full attention", visible=False, elem_id="image-full", **shown
                    )
                stats = gr.Markdown(elem_id="stats")
                gallery = gr.Gallery(
                    label="This session's results (newest first; select one for its parameters)",
                    columns=6,
                    fit_columns=False,  # thumbnails stay small however few there are
                    object_fit="contain",
                    height=GALLERY_HEIGHT,
                    format="png",
                    buttons=["download", "fullscreen"],
                    elem_id="gallery",
                )
                with gr.Row():
                    parameters = gr.JSON(label="Parameters of the selected image", elem_id="parameters")
                    downloads = gr.File(
                        label="PNG downloads (with the metadata of cleardit generate)",
                        file_count="multiple",
                        elem_id="downloads",
                    )

        preset.change(_pick_size, inputs=preset, outputs=[width, height], queue=False)
        upload.upload(lambda file: file, inputs=upload, outputs=weights, queue=False)
        run.click(
            generate_on_page,
            inputs=[prompt, width, height, radius, steps, seed, highres, strength, weights, compare, history],
            outputs=[message, image, full_image, stats, gallery, downloads, history],
            api_name="generate",
            concurrency_limit=1,
            concurrency_id="generation",
            show_progress="full",
            show_progress_on=[image, full_image],  # queue position and step bar over the images
        )
        gallery.select(show_parameters, inputs=history, outputs=parameters, queue=False)
    return page


def launch(page, host: str, port: int, output: str | os.PathLike) -> None:
    """Start serving ``page`` (returns once the server listens): one generation at a time."""
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        share=False,
        ssr_mode=False,
        allowed_paths=[str(Path(output).resolve())],
        theme=theme(),
        css=CSS,
        footer_links=["api"],
    )
    sys.stdout.flush()
