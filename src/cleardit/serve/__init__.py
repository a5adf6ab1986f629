"""``cleardit serve``: a local web page (Gradio) over ``cleardit.pipelines.generate``.

``model`` loads the pipeline once; ``request`` turns the page's controls into a ``GenerateConfig``
and runs ``generate`` (no second copy of the generation logic); ``page`` is the Gradio page and its
queue; ``cli`` is the subcommand. gradio (the ``ui`` extra) is imported only by ``page``.
"""
