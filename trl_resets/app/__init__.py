"""The application around the library (as TRL keeps its own in ``trl/scripts``): the main job's harness and its
recipes, the format warm-up, the embedded model, plots, the ``trl-resets`` command and the configuration reference
generator. The library (`trl_resets`) imports nothing from here."""
