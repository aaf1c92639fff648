"""``arrag serve``: a web app to watch retrieval at work.

- :mod:`.provenance`: provenance pictures (heat map of the retrieval share, source patches), shared with
  ``arrag generate --provenance``;
- :mod:`.captions`: world captions read back into prompts, so the world's checker can judge typed text;
- :mod:`.requests`: the app's work as pure functions (request -> images, verdicts and maps; patch -> source);
- :mod:`.layout`: the Gradio page wired to them (the only module that imports Gradio).
"""
