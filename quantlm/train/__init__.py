"""Training FloatLMs and TriLMs (DESIGN section 7).

Entry points: ``quantlm.train.run.train(recipe, out_dir, resume=..., overrides=...)`` returns the final HF
checkpoint folder; ``quantlm.train.data.heldout_token_ids(recipe)`` / ``heldout_text(recipe)`` give the
validation part of a recipe's corpus; ``quantlm.train.recipe.TrainRecipe`` is the recipe (YAML kind ``train``).
"""
