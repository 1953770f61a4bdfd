"""The victim zoo: competent backdoored and clean models, trained as an outsourced trainer
would, split into a tune half that defaults are chosen on and a held-out half that judges them.

    .venv/bin/python -m study.zoo build             # train the victims that are missing
    .venv/bin/python -m study.zoo defend --recipe default --half tune
    .venv/bin/python -m study.zoo report            # docs/experiments/zoo.md from zoo.jsonl
"""
