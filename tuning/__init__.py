"""Parameter search: a merge recipe with ranges, searched with Optuna on a validation set.

    from tuning.spec import load_search_spec
    from tuning.search import tune

    spec = load_search_spec("search.yaml")     # a recipe whose values may be {min, max} or {choices}
    result = tune(spec, storage="search.journal", study_name="demo")
    print(result.best_recipe, result.test)     # the best plain recipe, scored on the test split

``python -m merging tune`` is the command line; the studio's Tune tab runs the same search.
"""
